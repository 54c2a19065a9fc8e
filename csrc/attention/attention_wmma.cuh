// Tensor-core forward of flash attention for fp16/bf16 (WMMA 16x16x16, fp32 accumulation).
//
// A block of 4 warps owns 64 query rows (16 per warp) and walks the keys in tiles of 64 staged in
// shared memory. Per tile each warp computes its 16 x 64 scores with WMMA (Q K^T, K read as a
// column-major operand), applies scale, mask, causal and dropout and the online softmax in scalar
// code (two lanes per row, 32 columns each), writes the probabilities as fp16/bf16, and adds P V
// into its fp32 output rows, kept in shared memory so that the softmax can rescale them by row.
// Included by attention_cuda.cu; the caller checks the head dim (32, 64 or 128), the arch (sm_80+) and
// that the tiles fit the GPU's shared memory.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "common/host_device.h"
#include "common/launch.cuh"

namespace torchfast {
namespace wmma_attention {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kRowsPerWarp = 16, kRows = kWarps * kRowsPerWarp;  // 64 query rows per block
constexpr int kKeys = 64;                                         // keys per tile
constexpr int kHalfPad = 8, kFloatPad = 4;  // keep WMMA leading dims legal and spread the banks

template <typename scalar_t>
struct Native;  // the CUDA type WMMA takes for an ATen reduced-precision type
template <>
struct Native<at::Half> {
  using type = __half;
};
template <>
struct Native<at::BFloat16> {
  using type = __nv_bfloat16;
};

__host__ __device__ constexpr size_t round_up(size_t n) { return (n + 127) / 128 * 128; }

// Shared-memory layout for head dim D (all regions 128-byte aligned).
struct Layout {
  int ld_h;   // leading dim of the Q, K, V tiles (elements of 2 bytes)
  int ld_s;   // of a warp's fp32 scores
  int ld_p;   // of a warp's fp16/bf16 probabilities
  int ld_o;   // of a warp's fp32 output rows
  size_t q, k, v, s, p, o, total;  // byte offsets
  __host__ __device__ explicit Layout(int D) {
    ld_h = D + kHalfPad;
    ld_s = kKeys + kFloatPad;
    ld_p = kKeys + kHalfPad;
    ld_o = D + kFloatPad;
    q = 0;
    k = q + round_up(size_t(kRows) * ld_h * 2);
    v = k + round_up(size_t(kKeys) * ld_h * 2);
    s = v + round_up(size_t(kKeys) * ld_h * 2);
    p = s + round_up(size_t(kWarps) * kRowsPerWarp * ld_s * 4);
    o = p + round_up(size_t(kWarps) * kRowsPerWarp * ld_p * 2);
    total = o + round_up(size_t(kWarps) * kRowsPerWarp * ld_o * 4);
  }
};

template <typename T>
__device__ inline float to_float(T x) {
  return static_cast<float>(x);
}
__device__ inline float to_float(__half x) { return __half2float(x); }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename N>
__device__ inline N from_float(float x);
template <>
__device__ inline __half from_float<__half>(float x) {
  return __float2half(x);
}
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// Copies rows [r0, r0 + count) of a (B, H, N, D) operand into a tile (ld_h), zeros past `valid`.
template <typename N>
__device__ void load_tile(N* tile, int ld, const N* base, int64_t row_stride, int64_t r0, int64_t valid, int count,
                          int D) {
  for (int e = threadIdx.x; e < count * D; e += blockDim.x) {
    const int r = e / D, d = e % D;
    tile[r * ld + d] = r0 + r < valid ? base[(r0 + r) * row_stride + d] : from_float<N>(0.f);
  }
}

// s (16 x kKeys fp32, leading dim ld_s) = a (16 x D) times b^T, b being kKeys rows of D: one warp's
// scores (Q K^T in the forward; Q K^T and dO V^T in the backward). a and b have leading dim ld.
template <typename N, int D>
__device__ void warp_scores(float* s, int ld_s, const N* a, const N* b, int ld) {
  for (int nb = 0; nb < kKeys / 16; ++nb) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int kk = 0; kk < D; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, N, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, N, wmma::col_major> fbt;
      wmma::load_matrix_sync(fa, a + kk, ld);
      wmma::load_matrix_sync(fbt, b + (nb * 16) * ld + kk, ld);
      wmma::mma_sync(acc, fa, fbt, acc);
    }
    wmma::store_matrix_sync(s + nb * 16, acc, ld_s, wmma::mem_row_major);
  }
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(Rows<scalar_t> q, Rows<scalar_t> k, Rows<scalar_t> v, MaskView<float> mask, bool causal,
                   Dropout<float> drop, float scale, Dims dm, int64_t tiles, scalar_t* out, float* lse) {
#if TF_DEVICE_ARCH_AT_LEAST(800)
  using N = typename Native<scalar_t>::type;
  TF_DYNAMIC_SHARED(unsigned char, smem, 128);
  const Layout lay(D);
  N* q_s = reinterpret_cast<N*>(smem + lay.q);
  N* k_s = reinterpret_cast<N*>(smem + lay.k);
  N* v_s = reinterpret_cast<N*>(smem + lay.v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* s_w = reinterpret_cast<float*>(smem + lay.s) + warp * kRowsPerWarp * lay.ld_s;
  N* p_w = reinterpret_cast<N*>(smem + lay.p) + warp * kRowsPerWarp * lay.ld_p;
  float* o_w = reinterpret_cast<float*>(smem + lay.o) + warp * kRowsPerWarp * lay.ld_o;

  const int64_t bh = blockIdx.x / tiles, row0 = (blockIdx.x % tiles) * kRows;
  const int64_t b = bh / dm.H, h = bh % dm.H;
  load_tile(q_s, lay.ld_h, reinterpret_cast<const N*>(q.at(b, h, 0)), q.ld, row0, dm.L, kRows, D);
  for (int e = lane; e < kRowsPerWarp * D; e += 32) o_w[(e / D) * lay.ld_o + e % D] = 0.f;
  __syncwarp();  // each lane later reads rows other lanes zeroed

  // Lanes r and r + 16 share row r of the warp's 16; each takes 32 of the tile's 64 columns.
  const int r = lane & 15, side = lane >> 4;
  const int64_t i = row0 + warp * kRowsPerWarp + r;
  float m = -INFINITY, l = 0.f;
  const int64_t kv_end = causal ? (dm.S < row0 + kRows ? dm.S : row0 + kRows) : dm.S;
  for (int64_t j0 = 0; j0 < kv_end; j0 += kKeys) {
    __syncthreads();  // the previous tile is consumed (and q_s is written)
    load_tile(k_s, lay.ld_h, reinterpret_cast<const N*>(k.at(b, h, 0)), k.ld, j0, kv_end, kKeys, D);
    load_tile(v_s, lay.ld_h, reinterpret_cast<const N*>(v.at(b, h, 0)), v.ld, j0, kv_end, kKeys, D);
    __syncthreads();

    warp_scores<N, D>(s_w, lay.ld_s, q_s + (warp * kRowsPerWarp) * lay.ld_h, k_s, lay.ld_h);
    __syncwarp();

    // Online softmax over this row's 64 scores (32 per lane).
    float sv[32];
    float tile_max = -INFINITY;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const int col = side * 32 + c;
      const int64_t j = j0 + col;
      float x = -INFINITY;
      if (i < dm.L && j < kv_end && (!causal || j <= i)) {
        x = s_w[r * lay.ld_s + col] * scale;
        if (mask.data != nullptr) x += mask.row(b, h, i)[j];
      }
      sv[c] = x;
      tile_max = tf_max(tile_max, x);  // NaN-propagating (fmaxf would drop a NaN score)
    }
    tile_max = tf_max(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 16));
    const float new_m = tf_max(m, tile_max);
    const float corr = new_m == -INFINITY ? 1.f : __expf(m - new_m);
    float sum = 0.f;
    const uint32_t row_key = drop.on ? dropout_row_key(drop.seed, bh, i) : 0u;
#pragma unroll
    for (int c = 0; c < 32; ++c) {
      const int col = side * 32 + c;
      float p = new_m == -INFINITY ? 0.f : __expf(sv[c] - new_m);
      sum += p;
      // Dropped probabilities become 0 here; the kept ones' 1 / (1 - p) is applied to the output
      // in fp32 (in fp16 it could overflow for p close to 1).
      if (drop.on && dropout_bits(row_key, j0 + col) < drop.threshold) p = 0.f;
      p_w[r * lay.ld_p + col] = from_float<N>(p);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 16);
    l = l * corr + sum;
    m = new_m;
    for (int d = side * (D / 2); d < (side + 1) * (D / 2); ++d) o_w[r * lay.ld_o + d] *= corr;
    __syncwarp();

    // O += P V: (16 x 64) x (64 x D), D / 16 column blocks accumulated in shared memory.
    for (int db = 0; db < D / 16; ++db) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, o_w + db * 16, lay.ld_o, wmma::mem_row_major);
      for (int kk = 0; kk < kKeys; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, N, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, N, wmma::row_major> bv;
        wmma::load_matrix_sync(a, p_w + kk, lay.ld_p);
        wmma::load_matrix_sync(bv, v_s + kk * lay.ld_h + db * 16, lay.ld_h);
        wmma::mma_sync(acc, a, bv, acc);
      }
      wmma::store_matrix_sync(o_w + db * 16, acc, lay.ld_o, wmma::mem_row_major);
    }
    __syncwarp();
  }
  if (i < dm.L) {
    // Fully masked rows give 0; with dropout the kept probabilities are scaled by 1 / (1 - p) here.
    const float inv = l > 0.f ? (drop.on ? drop.keep_scale : 1.f) / l : 0.f;
    for (int d = side * (D / 2); d < (side + 1) * (D / 2); ++d)
      out[(bh * dm.L + i) * D + d] = static_cast<scalar_t>(o_w[r * lay.ld_o + d] * inv);
    if (side == 0) lse[bh * dm.L + i] = l > 0.f || l != l ? m + __logf(l) : -INFINITY;  // NaN stays NaN
  }
#else
  __trap();  // never launched: the host checks the kernel was built for sm_80+ (kernel_built_for_sm80)
#endif
}

// Whether `kernel`'s code on this device was compiled for sm_80 or newer (it has a body).
template <typename Kernel>
bool kernel_built_for_sm80(Kernel kernel) {
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky error of the query
    return false;
  }
  // binaryVersion alone is not enough: code JIT-compiled from an older PTX reports the device's
  // arch, yet its body is the pre-sm_80 trap.
  return attr.ptxVersion >= 80 && attr.binaryVersion >= 80;
}

}  // namespace wmma_attention
}  // namespace torchfast
