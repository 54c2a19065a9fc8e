// Tensor-core backward of flash attention for fp16/bf16 (WMMA 16x16x16, fp32 accumulation),
// flash-attention 2's order: a block of 4 warps owns a tile of 64 keys (K, V staged in shared
// memory, their dK and dV accumulated there in fp32) and walks the query tiles of 64 rows that can
// see them. Per query tile each warp recomputes its 16 rows' scores (Q K^T) and the probabilities
// from the saved logsumexp, computes dP = dO V^T, and writes P (dropped entries 0) and
// dS = P * (dP - delta) as fp16/bf16; then the block adds P^T dO into dV and dS^T Q into dK (each
// warp owns 16 of the keys), and each warp adds its rows' dS K into the fp32 dQ with atomics.
// Nothing of size L x S is stored. Included by attention_cuda.cu after attention_wmma.cuh; the
// caller checks the head dim (32, 64, 128, equal for K and V) and the arch (sm_80+).
#pragma once
#include "attention/attention_wmma.cuh"

namespace torchfast {
namespace wmma_attention {

// Shared-memory layout of the backward for head dim D (all regions 128-byte aligned).
struct BackwardLayout {
  int ld_h;  // Q, dO, K, V tiles (2-byte elements)
  int ld_s;  // a warp's fp32 scores, then its dP, then its dQ blocks
  int ld_p;  // P and dS (2-byte elements), 64 query rows x 64 keys
  int ld_o;  // dK and dV accumulators (fp32), 64 keys x D
  size_t q, dout, k, v, s, p, ds, dk, dv, lse, delta, total;
  __host__ __device__ explicit BackwardLayout(int D) {
    ld_h = D + kHalfPad;
    ld_s = kKeys + kFloatPad;
    ld_p = kKeys + kHalfPad;
    ld_o = D + kFloatPad;
    const size_t tile = round_up(size_t(kRows) * ld_h * 2), acc = round_up(size_t(kKeys) * ld_o * 4);
    q = 0;
    dout = q + tile;
    k = dout + tile;
    v = k + tile;
    s = v + tile;
    p = s + round_up(size_t(kRows) * ld_s * 4);
    ds = p + round_up(size_t(kRows) * ld_p * 2);
    dk = ds + round_up(size_t(kRows) * ld_p * 2);
    dv = dk + acc;
    lse = dv + acc;
    delta = lse + round_up(kRows * 4);
    total = delta + round_up(kRows * 4);
  }
};

// acc (16 x D fp32, leading dim ld_acc) += a^T b over the tile's 64 query rows: a is 64 rows x 16
// columns (this warp's keys) of P or dS, b is 64 rows x D of dO or Q.
template <typename N, int D>
__device__ void warp_add_transposed_product(float* acc, int ld_acc, const N* a, int ld_a, const N* b, int ld_b) {
  for (int db = 0; db < D / 16; ++db) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::load_matrix_sync(c, acc + db * 16, ld_acc, wmma::mem_row_major);
    for (int kk = 0; kk < kRows; kk += 16) {
      // a^T's block (keys x rows kk..kk+16) is a's block read column-major
      wmma::fragment<wmma::matrix_a, 16, 16, 16, N, wmma::col_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, N, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, a + kk * ld_a, ld_a);
      wmma::load_matrix_sync(fb, b + kk * ld_b + db * 16, ld_b);
      wmma::mma_sync(c, fa, fb, c);
    }
    wmma::store_matrix_sync(acc + db * 16, c, ld_acc, wmma::mem_row_major);
  }
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(Rows<scalar_t> dout, Rows<scalar_t> q, Rows<scalar_t> k, Rows<scalar_t> v, const float* lse,
                    const float* delta, MaskView<float> mask, bool causal, Dropout<float> drop, float scale, Dims dm,
                    int64_t tiles, float* dq, scalar_t* dk, scalar_t* dv) {
#if TF_DEVICE_ARCH_AT_LEAST(800)
  using N = typename Native<scalar_t>::type;
  TF_DYNAMIC_SHARED(unsigned char, smem, 128);
  const BackwardLayout lay(D);
  N* q_s = reinterpret_cast<N*>(smem + lay.q);
  N* do_s = reinterpret_cast<N*>(smem + lay.dout);
  N* k_s = reinterpret_cast<N*>(smem + lay.k);
  N* v_s = reinterpret_cast<N*>(smem + lay.v);
  N* p_s = reinterpret_cast<N*>(smem + lay.p);
  N* ds_s = reinterpret_cast<N*>(smem + lay.ds);
  float* dk_s = reinterpret_cast<float*>(smem + lay.dk);
  float* dv_s = reinterpret_cast<float*>(smem + lay.dv);
  float* lse_s = reinterpret_cast<float*>(smem + lay.lse);
  float* delta_s = reinterpret_cast<float*>(smem + lay.delta);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* s_w = reinterpret_cast<float*>(smem + lay.s) + warp * kRowsPerWarp * lay.ld_s;

  const int64_t bh = blockIdx.x / tiles, j0 = (blockIdx.x % tiles) * kKeys;
  const int64_t b = bh / dm.H, h = bh % dm.H;
  load_tile(k_s, lay.ld_h, reinterpret_cast<const N*>(k.at(b, h, 0)), k.ld, j0, dm.S, kKeys, D);
  load_tile(v_s, lay.ld_h, reinterpret_cast<const N*>(v.at(b, h, 0)), v.ld, j0, dm.S, kKeys, D);
  for (int e = threadIdx.x; e < kKeys * lay.ld_o; e += blockDim.x) dk_s[e] = dv_s[e] = 0.f;

  // Lanes r and r + 16 share row r of the warp's 16; each takes 32 of the tile's 64 keys.
  const int r = lane & 15, side = lane >> 4;
  const int row = warp * kRowsPerWarp + r;  // within the query tile
  // Causal: rows before j0 see none of these keys (query i sees keys j <= i).
  for (int64_t i0 = causal ? j0 : 0; i0 < dm.L; i0 += kRows) {
    __syncthreads();  // the previous query tile is consumed (first pass: K, V, dK, dV are set)
    load_tile(q_s, lay.ld_h, reinterpret_cast<const N*>(q.at(b, h, 0)), q.ld, i0, dm.L, kRows, D);
    load_tile(do_s, lay.ld_h, reinterpret_cast<const N*>(dout.at(b, h, 0)), dout.ld, i0, dm.L, kRows, D);
    for (int e = threadIdx.x; e < kRows; e += blockDim.x) {
      const bool in = i0 + e < dm.L;
      lse_s[e] = in ? lse[bh * dm.L + i0 + e] : -INFINITY;  // rows past L count as fully masked
      delta_s[e] = in ? delta[bh * dm.L + i0 + e] : 0.f;
    }
    __syncthreads();

    const int64_t i = i0 + row;
    const float lse_i = lse_s[row], delta_i = delta_s[row];
    // A fully masked row (logsumexp -inf) has no probabilities and no gradient; a NaN one stays NaN.
    const bool row_live = lse_i != -INFINITY;
    warp_scores<N, D>(s_w, lay.ld_s, q_s + warp * kRowsPerWarp * lay.ld_h, k_s, lay.ld_h);
    __syncwarp();
    float pv[32];
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const int col = side * 32 + c;
      const int64_t j = j0 + col;
      float p = 0.f;
      if (row_live && j < dm.S && (!causal || j <= i)) {
        float x = s_w[r * lay.ld_s + col] * scale;
        if (mask.data != nullptr) x += mask.row(b, h, i)[j];
        p = __expf(x - lse_i);
      }
      pv[c] = p;
    }
    __syncwarp();  // every lane has read its scores: s_w takes dP next
    warp_scores<N, D>(s_w, lay.ld_s, do_s + warp * kRowsPerWarp * lay.ld_h, v_s, lay.ld_h);
    __syncwarp();
    const uint32_t row_key = drop.on ? dropout_row_key(drop.seed, bh, i) : 0u;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const int col = side * 32 + c;
      const int64_t j = j0 + col;
      const bool live = row_live && j < dm.S && (!causal || j <= i);
      const bool kept = !drop.on || dropout_bits(row_key, j) >= drop.threshold;
      // z: the forward's dropout factor for (i, j) (0, or 1 / (1 - p) for a kept probability)
      const float z = kept ? (drop.on ? drop.keep_scale : 1.f) : 0.f;
      // Past the causal limit or the key count, dP may hold anything (even 0 x Inf): dS is 0 there.
      const float ds = live ? pv[c] * (s_w[r * lay.ld_s + col] * z - delta_i) : 0.f;
      // P is stored without 1 / (1 - p) (in fp16 it could overflow); dV gets that factor at the end.
      p_s[row * lay.ld_p + col] = from_float<N>(kept ? pv[c] : 0.f);
      ds_s[row * lay.ld_p + col] = from_float<N>(ds);
    }
    __syncthreads();  // P and dS of all 64 rows are in place

    // This warp's 16 keys: dV += P^T dO, dK += dS^T Q (dV takes the dropout scale and dK the softmax
    // scale once, at the end).
    const int key0 = warp * kRowsPerWarp;
    warp_add_transposed_product<N, D>(dv_s + key0 * lay.ld_o, lay.ld_o, p_s + key0, lay.ld_p, do_s, lay.ld_h);
    warp_add_transposed_product<N, D>(dk_s + key0 * lay.ld_o, lay.ld_o, ds_s + key0, lay.ld_p, q_s, lay.ld_h);

    // This warp's 16 rows: dQ += scale * dS K, 16 columns at a time through s_w, added atomically
    // (other key tiles add to the same rows).
    for (int db = 0; db < D / 16; ++db) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      wmma::fill_fragment(c, 0.f);
      for (int kk = 0; kk < kKeys; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, N, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, N, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, ds_s + warp * kRowsPerWarp * lay.ld_p + kk, lay.ld_p);
        wmma::load_matrix_sync(fb, k_s + kk * lay.ld_h + db * 16, lay.ld_h);
        wmma::mma_sync(c, fa, fb, c);
      }
      wmma::store_matrix_sync(s_w, c, lay.ld_s, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 16 * 16; e += 32) {
        const int rr = e / 16, cc = e % 16;
        const int64_t ii = i0 + warp * kRowsPerWarp + rr;
        const float g = s_w[rr * lay.ld_s + cc];
        if (ii < dm.L && g != 0.f) atomicAdd(&dq[(bh * dm.L + ii) * D + db * 16 + cc], g * scale);
      }
      __syncwarp();  // s_w is rewritten by the next block
    }
  }
  __syncthreads();
  const int64_t n = dm.S - j0 < kKeys ? dm.S - j0 : kKeys;
  const float dv_scale = drop.on ? drop.keep_scale : 1.f;
  for (int e = threadIdx.x; e < n * D; e += blockDim.x) {
    const int jj = e / D, d = e % D;
    dk[(bh * dm.S + j0 + jj) * D + d] = static_cast<scalar_t>(dk_s[jj * lay.ld_o + d] * scale);
    dv[(bh * dm.S + j0 + jj) * D + d] = static_cast<scalar_t>(dv_s[jj * lay.ld_o + d] * dv_scale);
  }
#else
  __trap();  // never launched: the host checks the kernel was built for sm_80+ (kernel_built_for_sm80)
#endif
}

}  // namespace wmma_attention
}  // namespace torchfast
