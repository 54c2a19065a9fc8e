// CUDA kernels of torchfast::flash_attention and torchfast::flash_attention_backward.
//
// fp16/bf16 forwards with head dims 32, 64 or 128 on sm_80+ run on tensor cores
// (attention_wmma.cuh); so do such backwards when TORCHFAST_ATTENTION_WMMA_BACKWARD=1
// (attention_wmma_backward.cuh: off by default until checked on a GPU). Everything else runs on
// the scalar kernels below (FMAs in the compute type):
// Forward: a block of 4 warps owns 16 query rows (4 per warp, scaled q in shared memory) and walks
// the keys in tiles of 32 staged in shared memory. Lane j scores key j of the tile; the warp keeps
// the online-softmax row max and sum; the output row lives in registers, lane-strided over the
// head dim (NT values per lane, head dims up to 32 * NT).
// Backward (flash-attention 2's order): a block owns a tile of 32 keys and walks every query row
// that can see them, one row per warp at a time: it recomputes the probabilities from logsumexp,
// accumulates dK and dV for its keys in shared memory, and adds dQ into an fp32 (fp64) buffer
// with atomics. Nothing of size L x S is ever stored.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "attention/attention_checks.h"
#include "attention/attention_math.h"
#include "common/host_device.h"
#include "common/launch.cuh"

namespace torchfast {
namespace {

constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kRowsPerWarp = 4, kRows = kWarps * kRowsPerWarp;  // forward: query rows per block
constexpr int kKeys = 32;                                       // keys per tile: one per lane
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
__device__ inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}
__device__ inline float attn_exp(float x) { return ::expf(x); }
__device__ inline double attn_exp(double x) { return ::exp(x); }
__device__ inline float attn_log(float x) { return ::logf(x); }
__device__ inline double attn_log(double x) { return ::log(x); }

template <typename T>
__device__ inline T warp_max(T v) {
  for (int o = 16; o > 0; o /= 2) v = tf_max(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
template <typename T>
__device__ inline T warp_sum(T v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

template <typename acc_t>
struct Dropout {
  bool on;
  uint32_t threshold;
  acc_t keep_scale;
  uint64_t seed;
  __device__ acc_t factor(int64_t bh, int64_t i, int64_t j) const {
    return dropout_bits(dropout_row_key(seed, bh, i), j) >= threshold ? keep_scale : acc_t(0);
  }
};

struct Dims {
  int64_t B, H, L, S, D, Dv;
};

// Stages keys [j0, j0 + n) of k (rows padded to ld_s) in shared memory as acc_t; zeros past n.
template <typename scalar_t, typename acc_t>
__device__ void stage_tile(acc_t* dst, int ld_s, const Rows<scalar_t>& src, int64_t b, int64_t h, int64_t j0, int n,
                           int64_t width) {
  for (int64_t e = threadIdx.x; e < kKeys * width; e += blockDim.x) {
    const int j = static_cast<int>(e / width);
    const int64_t d = e % width;
    dst[j * ld_s + d] = j < n ? static_cast<acc_t>(src.at(b, h, j0 + j)[d]) : acc_t(0);
  }
}

template <typename scalar_t, int NT>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(Rows<scalar_t> q, Rows<scalar_t> k, Rows<scalar_t> v, MaskView<acc_type_t<scalar_t>> mask,
                             bool causal, Dropout<acc_type_t<scalar_t>> drop, acc_type_t<scalar_t> scale, Dims dm,
                             int64_t tiles, scalar_t* out, acc_type_t<scalar_t>* lse) {
  using acc_t = acc_type_t<scalar_t>;
  TF_DYNAMIC_SHARED(unsigned char, smem_raw, 16);
  const int D = static_cast<int>(dm.D), Dv = static_cast<int>(dm.Dv);
  acc_t* q_s = reinterpret_cast<acc_t*>(smem_raw);  // kRows x D
  acc_t* k_s = q_s + kRows * D;                      // kKeys x (D + 1): lane j reads row j
  acc_t* v_s = k_s + kKeys * (D + 1);                // kKeys x Dv: lanes read along a row
  const int64_t bh = blockIdx.x / tiles, row0 = (blockIdx.x % tiles) * kRows;
  const int64_t b = bh / dm.H, h = bh % dm.H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int e = threadIdx.x; e < kRows * D; e += blockDim.x) {
    const int64_t i = row0 + e / D;
    q_s[e] = i < dm.L ? static_cast<acc_t>(q.at(b, h, i)[e % D]) * scale : acc_t(0);
  }
  acc_t m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][NT];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = neg_inf<acc_t>();
    l[rr] = acc_t(0);
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[rr][t] = acc_t(0);
  }
  const int64_t kv_end = causal ? (dm.S < row0 + kRows ? dm.S : row0 + kRows) : dm.S;
  for (int64_t j0 = 0; j0 < kv_end; j0 += kKeys) {
    const int n = static_cast<int>(kv_end - j0 < kKeys ? kv_end - j0 : kKeys);
    __syncthreads();  // the previous tile is consumed (and q_s is written)
    stage_tile(k_s, D + 1, k, b, h, j0, n, D);
    stage_tile(v_s, Dv, v, b, h, j0, n, Dv);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t i = row0 + r, j = j0 + lane;
      if (i >= dm.L) continue;  // uniform across the warp (and so are the later rows)
      acc_t s = neg_inf<acc_t>();
      if (lane < n && (!causal || j <= i)) {
        acc_t dot = acc_t(0);
        for (int d = 0; d < D; ++d) dot += q_s[r * D + d] * k_s[lane * (D + 1) + d];
        s = dot + (mask.data != nullptr ? mask.row(b, h, i)[j] : acc_t(0));
      }
      const acc_t new_m = tf_max(m[rr], warp_max(s));
      acc_t p = acc_t(0), corr = acc_t(1);
      if (new_m != neg_inf<acc_t>()) {
        p = attn_exp(s - new_m);
        corr = attn_exp(m[rr] - new_m);
      }
      l[rr] = l[rr] * corr + warp_sum(p);
      m[rr] = new_m;
      if (drop.on && lane < n) p *= drop.factor(bh, i, j);  // after the normaliser, as on the CPU
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[rr][t] *= corr;
      for (int jj = 0; jj < n; ++jj) {
        const acc_t pj = __shfl_sync(kFull, p, jj);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const int d = lane + 32 * t;
          if (d < Dv) acc[rr][t] += pj * v_s[jj * Dv + d];
        }
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t i = row0 + warp * kRowsPerWarp + rr;
    if (i >= dm.L) continue;
    const acc_t inv = l[rr] > acc_t(0) ? acc_t(1) / l[rr] : acc_t(0);  // fully masked rows give 0
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int d = lane + 32 * t;
      if (d < Dv) out[(bh * dm.L + i) * Dv + d] = static_cast<scalar_t>(acc[rr][t] * inv);
    }
    // a NaN score leaves l NaN: the output is NaN (acc is) and so is the logsumexp, as in torch
    if (lane == 0) lse[bh * dm.L + i] = l[rr] > acc_t(0) || l[rr] != l[rr] ? m[rr] + attn_log(l[rr]) : neg_inf<acc_t>();
  }
}

template <typename scalar_t, int NT>
__global__ void __launch_bounds__(kThreads)
    attention_backward_kernel(Rows<scalar_t> dout, Rows<scalar_t> q, Rows<scalar_t> k, Rows<scalar_t> v,
                              const acc_type_t<scalar_t>* lse, const acc_type_t<scalar_t>* delta,
                              MaskView<acc_type_t<scalar_t>> mask, bool causal, Dropout<acc_type_t<scalar_t>> drop,
                              acc_type_t<scalar_t> scale, Dims dm, int64_t tiles, acc_type_t<scalar_t>* dq,
                              scalar_t* dk, scalar_t* dv) {
  using acc_t = acc_type_t<scalar_t>;
  TF_DYNAMIC_SHARED(unsigned char, smem_raw, 16);
  const int D = static_cast<int>(dm.D), Dv = static_cast<int>(dm.Dv);
  acc_t* k_s = reinterpret_cast<acc_t*>(smem_raw);  // kKeys x (D + 1)
  acc_t* v_s = k_s + kKeys * (D + 1);                // kKeys x (Dv + 1)
  acc_t* dk_s = v_s + kKeys * (Dv + 1);              // kKeys x (D + 1)
  acc_t* dv_s = dk_s + kKeys * (D + 1);              // kKeys x (Dv + 1)
  acc_t* rows_s = dv_s + kKeys * (Dv + 1);           // per warp: q row (D) then dO row (Dv)
  const int64_t bh = blockIdx.x / tiles, j0 = (blockIdx.x % tiles) * kKeys;
  const int64_t b = bh / dm.H, h = bh % dm.H;
  const int n = static_cast<int>(dm.S - j0 < kKeys ? dm.S - j0 : kKeys);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  stage_tile(k_s, D + 1, k, b, h, j0, n, D);
  stage_tile(v_s, Dv + 1, v, b, h, j0, n, Dv);
  for (int e = threadIdx.x; e < kKeys * (D + 1); e += blockDim.x) dk_s[e] = acc_t(0);
  for (int e = threadIdx.x; e < kKeys * (Dv + 1); e += blockDim.x) dv_s[e] = acc_t(0);
  __syncthreads();

  acc_t* qr = rows_s + warp * (D + Dv);
  acc_t* gr = qr + D;
  const int64_t j = j0 + lane;
  for (int64_t i = (causal ? j0 : 0) + warp; i < dm.L; i += kWarps) {
    for (int d = lane; d < D; d += 32) qr[d] = static_cast<acc_t>(q.at(b, h, i)[d]);
    for (int d = lane; d < Dv; d += 32) gr[d] = static_cast<acc_t>(dout.at(b, h, i)[d]);
    __syncwarp();
    const acc_t lse_i = lse[bh * dm.L + i];
    acc_t ds = acc_t(0), pz = acc_t(0);
    if (lane < n && lse_i != neg_inf<acc_t>() && (!causal || j <= i)) {
      acc_t dot = acc_t(0), dpv = acc_t(0);
      for (int d = 0; d < D; ++d) dot += qr[d] * k_s[lane * (D + 1) + d];
      for (int d = 0; d < Dv; ++d) dpv += gr[d] * v_s[lane * (Dv + 1) + d];
      const acc_t s = dot * scale + (mask.data != nullptr ? mask.row(b, h, i)[j] : acc_t(0));
      const acc_t p = attn_exp(s - lse_i);
      const acc_t z = drop.on ? drop.factor(bh, i, j) : acc_t(1);
      pz = p * z;
      ds = p * (dpv * z - delta[bh * dm.L + i]);
    }
    if (pz != acc_t(0))
      for (int d = 0; d < Dv; ++d) atomicAdd(&dv_s[lane * (Dv + 1) + d], pz * gr[d]);
    if (ds != acc_t(0))
      for (int d = 0; d < D; ++d) atomicAdd(&dk_s[lane * (D + 1) + d], ds * scale * qr[d]);
    acc_t dqv[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) dqv[t] = acc_t(0);
    for (int jj = 0; jj < n; ++jj) {
      const acc_t dsj = __shfl_sync(kFull, ds, jj);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int d = lane + 32 * t;
        if (d < D) dqv[t] += dsj * k_s[jj * (D + 1) + d];
      }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int d = lane + 32 * t;
      if (d < D && dqv[t] != acc_t(0)) atomicAdd(&dq[(bh * dm.L + i) * D + d], dqv[t] * scale);
    }
    __syncwarp();  // qr/gr are rewritten for the next row
  }
  __syncthreads();
  for (int e = threadIdx.x; e < n * D; e += blockDim.x)
    dk[(bh * dm.S + j0) * D + e] = static_cast<scalar_t>(dk_s[(e / D) * (D + 1) + e % D]);
  for (int e = threadIdx.x; e < n * Dv; e += blockDim.x)
    dv[(bh * dm.S + j0) * Dv + e] = static_cast<scalar_t>(dv_s[(e / Dv) * (Dv + 1) + e % Dv]);
}

// Head-dim bucket: the kernels hold NT values per lane, so head dims up to 32 * NT.
template <typename F>
void with_head_dim_bucket(int64_t width, const F& f) {
  if (width <= 64) {
    f(std::integral_constant<int, 2>{});
  } else if (width <= 128) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

// Whether a block may use `bytes` of shared memory on this GPU (on sm_86/89 the tensor-core forward
// fits up to D = 64 and the backward only D = 32; on sm_80 the backward up to D = 64: the others
// run the scalar kernels).
bool fits_shared_memory(size_t bytes) {
  return bytes <= at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes, int64_t D, int64_t Dv) {
  TORCH_CHECK(fits_shared_memory(bytes), "torchfast.flash_attention: head dims (", D, ", ", Dv, ") need ", bytes,
              " bytes of shared memory per block; this GPU offers ",
              at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

unsigned int grid_size(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "torchfast.flash_attention: ", blocks,
              " thread blocks exceed the CUDA grid limit; split the batch");
  return static_cast<unsigned int>(blocks);
}

template <typename acc_t>
Dropout<acc_t> make_dropout(double p, uint64_t seed) {
  return {p > 0.0, dropout_threshold(p), p < 1.0 ? static_cast<acc_t>(1.0 / (1.0 - p)) : acc_t(0), seed};
}

}  // namespace

}  // namespace torchfast

#include "attention/attention_wmma.cuh"
#include "attention/attention_wmma_backward.cuh"

namespace torchfast {
namespace {

// Whether a tensor-core kernel can take this call: fp16/bf16, equal head dims of 32, 64 or 128,
// sm_80+.
bool wmma_shape(const at::Tensor& q, const AttnShape& sh) {
  const bool reduced = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  const bool dims = sh.D == sh.Dv && (sh.D == 32 || sh.D == 64 || sh.D == 128);
  return reduced && dims && at::cuda::getCurrentDeviceProperties()->major >= 8;
}

// A switch that is on unless set to "0" (default_on), or off unless set to "1".
bool env_flag(const char* name, bool default_on) {
  const char* env = std::getenv(name);
  if (env == nullptr) return default_on;
  return default_on ? std::string(env) != "0" : std::string(env) == "1";
}

// The tensor-core forward is on unless TORCHFAST_ATTENTION_WMMA=0. The tensor-core backward is off
// unless TORCHFAST_ATTENTION_WMMA_BACKWARD=1, until it has been checked on a GPU. Read per call (a
// getenv is nothing beside a kernel launch), so that a test or benchmark can switch them.
bool use_wmma_forward(const at::Tensor& q, const AttnShape& sh) {
  return env_flag("TORCHFAST_ATTENTION_WMMA", true) && wmma_shape(q, sh);
}
bool use_wmma_backward(const at::Tensor& q, const AttnShape& sh) {
  return env_flag("TORCHFAST_ATTENTION_WMMA_BACKWARD", false) && wmma_shape(q, sh);
}

// Runs the tensor-core forward and returns true, or returns false (nothing launched) when its
// kernel was not built for this GPU's arch or its tiles do not fit the GPU's shared memory.
template <typename scalar_t>
bool launch_wmma_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                         bool causal, const Dropout<float>& drop, float scale, const Dims& dm, at::Tensor& out,
                         at::Tensor& lse, cudaStream_t stream) {
  namespace wa = wmma_attention;
  const int64_t tiles = (dm.L + wa::kRows - 1) / wa::kRows;
  const size_t smem = wa::Layout(static_cast<int>(dm.D)).total;
  auto launch = [&](auto tensor_core_forward) {
    if (!wa::kernel_built_for_sm80(tensor_core_forward) || !fits_shared_memory(smem)) return false;
    allow_shared_memory(tensor_core_forward, smem, dm.D, dm.Dv);
    tf_launch(tensor_core_forward, grid_size(dm.B * dm.H * tiles), wa::kThreads, smem, stream, rows_of<scalar_t>(q),
              rows_of<scalar_t>(k), rows_of<scalar_t>(v), mask_view<float>(mask), causal, drop, scale, dm, tiles,
              out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  };
  if (dm.D == 32) return launch(wa::forward_kernel<scalar_t, 32>);
  if (dm.D == 64) return launch(wa::forward_kernel<scalar_t, 64>);
  return launch(wa::forward_kernel<scalar_t, 128>);
}

// Runs the tensor-core backward and returns true, or returns false (nothing launched) when its
// kernel was not built for this GPU's arch or its tiles do not fit the GPU's shared memory.
template <typename scalar_t>
bool launch_wmma_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& mask, bool causal,
                          const Dropout<float>& drop, float scale, const Dims& dm, at::Tensor& dq, at::Tensor& dk,
                          at::Tensor& dv, cudaStream_t stream) {
  namespace wa = wmma_attention;
  const int64_t tiles = (dm.S + wa::kKeys - 1) / wa::kKeys;
  const size_t smem = wa::BackwardLayout(static_cast<int>(dm.D)).total;
  auto launch = [&](auto tensor_core_backward) {
    if (!wa::kernel_built_for_sm80(tensor_core_backward) || !fits_shared_memory(smem)) return false;
    allow_shared_memory(tensor_core_backward, smem, dm.D, dm.Dv);
    tf_launch(tensor_core_backward, grid_size(dm.B * dm.H * tiles), wa::kThreads, smem, stream,
              rows_of<scalar_t>(dout), rows_of<scalar_t>(q), rows_of<scalar_t>(k), rows_of<scalar_t>(v),
              lse.const_data_ptr<float>(), delta.const_data_ptr<float>(), mask_view<float>(mask), causal, drop, scale,
              dm, tiles, dq.mutable_data_ptr<float>(), dk.mutable_data_ptr<scalar_t>(),
              dv.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  };
  if (dm.D == 32) return launch(wa::backward_kernel<scalar_t, 32>);
  if (dm.D == 64) return launch(wa::backward_kernel<scalar_t, 64>);
  return launch(wa::backward_kernel<scalar_t, 128>);
}

// The limits of torchfast/ops/attention.py's CUDA_MAX_HEAD_DIM(_FP64): fp64 tiles of larger head
// dims do not fit the backward's shared memory.
void check_head_dims(const AttnShape& sh, at::ScalarType dtype) {
  const int64_t limit = dtype == at::kDouble ? 128 : 256;
  TORCH_CHECK(sh.D <= limit && sh.Dv <= limit, "torchfast.flash_attention: the CUDA kernel takes ", dtype,
              " head dims up to ", limit, ", got ", sh.D, " and ", sh.Dv,
              " (torchfast.nn.functional.scaled_dot_product_attention routes larger ones to the reference)");
}

std::tuple<at::Tensor, at::Tensor> flash_attention_cuda(const at::Tensor& query, const at::Tensor& key,
                                                        const at::Tensor& value,
                                                        const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                                        double scale, double dropout_p,
                                                        const std::optional<at::Tensor>& rng_seed) {
  const AttnShape sh =
      check_attention_args("torchfast.flash_attention", query, key, value, attn_mask, scale, dropout_p, rng_seed);
  check_head_dims(sh, query.scalar_type());
  const c10::cuda::CUDAGuard guard(query.device());
  const auto ct = attention_compute_type(query);
  const at::Tensor q = attention_operand(query, query.scalar_type());
  const at::Tensor k = attention_operand(key, query.scalar_type()), v = attention_operand(value, query.scalar_type());
  const at::Tensor mask = attention_mask_operand(attn_mask, sh, ct);
  at::Tensor out = at::empty({sh.B, sh.H, sh.L, sh.Dv}, query.options());
  at::Tensor lse = at::empty({sh.B, sh.H, sh.L}, query.options().dtype(ct));
  const uint64_t seed = attention_seed(dropout_p, rng_seed);
  if (sh.B * sh.H * sh.L == 0) return {out, lse};
  const int64_t tiles = (sh.L + kRows - 1) / kRows;
  const Dims dm{sh.B, sh.H, sh.L, sh.S, sh.D, sh.Dv};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (use_wmma_forward(query, sh)) {
    bool launched = false;
    AT_DISPATCH_REDUCED_FLOATING_TYPES(query.scalar_type(), "flash_attention_cuda_wmma", [&] {
      launched = launch_wmma_forward<scalar_t>(q, k, v, mask, is_causal, make_dropout<float>(dropout_p, seed),
                                               static_cast<float>(scale), dm, out, lse, stream);
    });
    if (launched) return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "flash_attention_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const size_t smem = sizeof(acc_t) * (kRows * sh.D + kKeys * (sh.D + 1) + kKeys * sh.Dv);
    with_head_dim_bucket(std::max(sh.D, sh.Dv), [&](auto nt) {
      auto scalar_forward = attention_forward_kernel<scalar_t, decltype(nt)::value>;
      allow_shared_memory(scalar_forward, smem, sh.D, sh.Dv);
      tf_launch(scalar_forward, grid_size(sh.B * sh.H * tiles), kThreads, smem, stream, rows_of<scalar_t>(q),
                rows_of<scalar_t>(k), rows_of<scalar_t>(v), mask_view<acc_t>(mask), is_causal,
                make_dropout<acc_t>(dropout_p, seed), static_cast<acc_t>(scale), dm, tiles,
                out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& logsumexp, const std::optional<at::Tensor>& attn_mask, bool is_causal,
    double scale, double dropout_p, const std::optional<at::Tensor>& rng_seed) {
  const AttnShape sh = check_attention_backward_args(grad_out, query, key, value, out, logsumexp, attn_mask, scale,
                                                    dropout_p, rng_seed);
  check_head_dims(sh, query.scalar_type());
  const c10::cuda::CUDAGuard guard(query.device());
  const auto dt = query.scalar_type();
  const auto ct = attention_compute_type(query);
  const at::Tensor q = attention_operand(query, dt), k = attention_operand(key, dt), v = attention_operand(value, dt);
  const at::Tensor dout = attention_operand(grad_out, dt);
  const at::Tensor lse = logsumexp.to(ct).contiguous();
  // delta_i = sum_d dO[i, d] O[i, d] (O(L) memory).
  const at::Tensor delta = grad_out.to(ct).mul(out.to(ct)).sum(-1).contiguous();
  const at::Tensor mask = attention_mask_operand(attn_mask, sh, ct);
  at::Tensor dq = at::zeros({sh.B, sh.H, sh.L, sh.D}, query.options().dtype(ct));
  at::Tensor dk = at::empty({sh.B, sh.H, sh.S, sh.D}, query.options());
  at::Tensor dv = at::empty({sh.B, sh.H, sh.S, sh.Dv}, query.options());
  const uint64_t seed = attention_seed(dropout_p, rng_seed);
  if (sh.B * sh.H * sh.S > 0) {
    const int64_t tiles = (sh.S + kKeys - 1) / kKeys;
    const Dims dm{sh.B, sh.H, sh.L, sh.S, sh.D, sh.Dv};
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    bool launched = false;
    if (use_wmma_backward(query, sh)) {
      AT_DISPATCH_REDUCED_FLOATING_TYPES(dt, "flash_attention_backward_cuda_wmma", [&] {
        launched = launch_wmma_backward<scalar_t>(dout, q, k, v, lse, delta, mask, is_causal,
                                                  make_dropout<float>(dropout_p, seed), static_cast<float>(scale), dm,
                                                  dq, dk, dv, stream);
      });
    }
    if (!launched) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "flash_attention_backward_cuda", [&] {
      using acc_t = acc_type_t<scalar_t>;
      const size_t smem = sizeof(acc_t) * (2 * kKeys * (sh.D + 1) + 2 * kKeys * (sh.Dv + 1) + kWarps * (sh.D + sh.Dv));
      with_head_dim_bucket(std::max(sh.D, sh.Dv), [&](auto nt) {
        auto scalar_backward = attention_backward_kernel<scalar_t, decltype(nt)::value>;
        allow_shared_memory(scalar_backward, smem, sh.D, sh.Dv);
        tf_launch(scalar_backward, grid_size(sh.B * sh.H * tiles), kThreads, smem, stream, rows_of<scalar_t>(dout),
                  rows_of<scalar_t>(q), rows_of<scalar_t>(k), rows_of<scalar_t>(v), lse.const_data_ptr<acc_t>(),
                  delta.const_data_ptr<acc_t>(), mask_view<acc_t>(mask), is_causal,
                  make_dropout<acc_t>(dropout_p, seed), static_cast<acc_t>(scale), dm, tiles,
                  dq.mutable_data_ptr<acc_t>(), dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {dq.scalar_type() == dt ? dq : dq.to(dt), dk, dv};
}

}  // namespace

TF_CUDA_LIBRARY_IMPL(m) {
  m.impl("flash_attention", &flash_attention_cuda);
  m.impl("flash_attention_backward", &flash_attention_backward_cuda);
}

}  // namespace torchfast
