// CUDA kernels of torchfast::bn_add_relu and torchfast::bn_add_relu_backward.
//
// The statistics (two passes: mean, then squared deviations, as on the CPU) and the backward's
// sums run as per-channel partial sums over a 2-D grid (chunks of rows x channels, coalesced in
// both layouts) combined per channel in double; the output and the input gradient are grid-stride
// element-wise kernels. All through the math shared with the CPU kernel (norm/bn_relu_math.h).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "common/host_device.h"
#include "common/launch.cuh"
#include "norm/bn_relu_checks.h"
#include "norm/bn_relu_layout.h"
#include "norm/bn_relu_math.h"

namespace torchfast {
namespace {

constexpr int kThreads = 512;

struct Geometry {
  int64_t N, C, S, M;
  bool planar;
};

// Channel of the element at flat offset `off`. The element-wise kernels index in 32 bits when the
// tensor allows (a 64-bit division costs several times a 32-bit one, per element).
template <typename index_t>
__device__ inline index_t channel_of(const Geometry& g, index_t off) {
  return g.planar ? (off / static_cast<index_t>(g.S)) % static_cast<index_t>(g.C) : off % static_cast<index_t>(g.C);
}

template <typename F>
void with_index_type(int64_t numel, const F& f) {
  // below 2^31 the grid-stride increment (at most 65535 x 512) cannot wrap a uint32_t
  if (numel < (int64_t(1) << 31)) {
    f(uint32_t{});
  } else {
    f(int64_t{});
  }
}

// Per-channel sums, in two launches. channel_partials_kernel: a 2-D grid, blockIdx.y one chunk of
// the M elements of a channel, blockIdx.x one channel (planar: the block's threads walk the
// channel's contiguous runs) or 32 channels (packed: a warp reads 32 adjacent channels of one
// row, coalesced, and the block's 8 warps take every 8th row); each block writes its K sums per
// channel to partial[chunk][k][c] (double). channel_finalize_kernel adds the chunks per channel
// and hands the K totals to `fin`. Enough blocks to fill the GPU for any C, and no strided reads.
constexpr int kSumThreads = 256, kChannelLanes = 32, kRowLanes = kSumThreads / kChannelLanes;

template <int K, typename index_t, typename Elem>
__global__ void __launch_bounds__(kSumThreads)
    channel_partials_kernel(Geometry g, int64_t chunk_len, Elem elem, double* partial) {
  using acc_t = typename Elem::acc_t;
  acc_t acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = acc_t(0);
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * chunk_len;
  const int64_t end = begin + chunk_len < g.M ? begin + chunk_len : g.M;
  const int lane = threadIdx.x % kChannelLanes, row_lane = threadIdx.x / kChannelLanes;
  const int64_t c = g.planar ? static_cast<int64_t>(blockIdx.x)
                             : static_cast<int64_t>(blockIdx.x) * kChannelLanes + lane;
  if (g.planar) {
    const index_t S = static_cast<index_t>(g.S), C = static_cast<index_t>(g.C), ci = static_cast<index_t>(c);
    for (index_t i = static_cast<index_t>(begin) + threadIdx.x; i < static_cast<index_t>(end); i += kSumThreads)
      elem(static_cast<int64_t>(((i / S) * C + ci) * S + i % S), c, acc);
  } else if (c < g.C) {
    for (int64_t row = begin + row_lane; row < end; row += kRowLanes) elem(row * g.C + c, c, acc);
  }
  TF_SHARED(double, buf, [K][kSumThreads]);
#pragma unroll
  for (int k = 0; k < K; ++k) buf[k][threadIdx.x] = static_cast<double>(acc[k]);
  __syncthreads();
  double* out = partial + static_cast<int64_t>(blockIdx.y) * K * g.C;
  if (g.planar) {  // all threads hold the one channel: a tree over the block
    for (int stride = kSumThreads / 2; stride > 0; stride /= 2) {
      if (threadIdx.x < stride)
        for (int k = 0; k < K; ++k) buf[k][threadIdx.x] += buf[k][threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0)
      for (int k = 0; k < K; ++k) out[k * g.C + c] = buf[k][0];
  } else if (row_lane == 0 && c < g.C) {  // the 8 row lanes of each channel
    for (int k = 0; k < K; ++k) {
      double t = 0;
      for (int r = 0; r < kRowLanes; ++r) t += buf[k][r * kChannelLanes + lane];
      out[k * g.C + c] = t;
    }
  }
}

// 32 channels per block; its 8 warps take every 8th chunk, then the 8 sums per channel are added.
template <int K, typename Fin>
__global__ void __launch_bounds__(kSumThreads)
    channel_finalize_kernel(const double* partial, int64_t chunks, int64_t C, Fin fin) {
  const int lane = threadIdx.x % kChannelLanes, chunk_lane = threadIdx.x / kChannelLanes;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kChannelLanes + lane;
  double t[K];
  for (int k = 0; k < K; ++k) t[k] = 0;
  if (c < C)
    for (int64_t ch = chunk_lane; ch < chunks; ch += kRowLanes)
      for (int k = 0; k < K; ++k) t[k] += partial[(ch * K + k) * C + c];
  TF_SHARED(double, buf, [K][kSumThreads]);
  for (int k = 0; k < K; ++k) buf[k][threadIdx.x] = t[k];
  __syncthreads();
  if (chunk_lane == 0 && c < C) {
    for (int k = 0; k < K; ++k) {
      t[k] = 0;
      for (int r = 0; r < kRowLanes; ++r) t[k] += buf[k][r * kChannelLanes + lane];
    }
    fin(c, t);
  }
}

// Runs both launches (M > 0).
template <int K, typename Elem, typename Fin>
void channel_sums(const Geometry& g, const Elem& elem, const Fin& fin, const at::Tensor& like, cudaStream_t stream) {
  const int64_t groups = g.planar ? g.C : (g.C + kChannelLanes - 1) / kChannelLanes;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t min_chunk = g.planar ? 4 * kSumThreads : 8 * kRowLanes;  // elements (planar) or rows per block
  int64_t chunks = std::min<int64_t>({(8 * sms + groups - 1) / groups, (g.M + min_chunk - 1) / min_chunk, 65535});
  chunks = std::max<int64_t>(chunks, 1);
  const int64_t len = (g.M + chunks - 1) / chunks;
  chunks = (g.M + len - 1) / len;
  TORCH_CHECK(groups <= std::numeric_limits<int>::max(), "torchfast.bn_add_relu: ", g.C, " channels exceed the CUDA grid");
  const at::Tensor partial = at::empty({chunks, K, g.C}, like.options().dtype(at::kDouble));
  with_index_type(g.M * g.C, [&](auto index) {
    tf_launch(channel_partials_kernel<K, decltype(index), Elem>,
              dim3(static_cast<unsigned>(groups), static_cast<unsigned>(chunks)), kSumThreads, 0, stream, g, len, elem,
              partial.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  tf_launch(channel_finalize_kernel<K, Fin>, static_cast<unsigned>((g.C + kChannelLanes - 1) / kChannelLanes),
            kSumThreads, 0, stream, partial.const_data_ptr<double>(), chunks, g.C, fin);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Per-element contributions (Elem) and per-channel results (Fin) of the sums above.
template <typename scalar_t, typename acc_type>
struct SumInput {  // sum x
  using acc_t = acc_type;
  const scalar_t* x;
  __device__ void operator()(int64_t off, int64_t, acc_t* acc) const { acc[0] += static_cast<acc_t>(x[off]); }
};
template <typename scalar_t, typename acc_type>
struct SumSquaredDeviation {  // sum (x - mean)^2: the variance's second pass, as on the CPU
  using acc_t = acc_type;
  const scalar_t* x;
  const acc_t* mean;
  __device__ void operator()(int64_t off, int64_t c, acc_t* acc) const {
    const acc_t d = static_cast<acc_t>(x[off]) - mean[c];
    acc[0] += d * d;
  }
};
template <typename scalar_t, typename acc_type>
struct SumGradTerms {  // sum dy and sum dy * (x - mean), dy the ReLU-masked grad_out
  using acc_t = acc_type;
  const scalar_t *grad_out, *out, *x;
  const acc_t* mean;
  bool relu;
  __device__ void operator()(int64_t off, int64_t c, acc_t* acc) const {
    const acc_t dy = relu_backward(static_cast<acc_t>(grad_out[off]), static_cast<acc_t>(out[off]), relu);
    acc[0] += dy;
    acc[1] += dy * (static_cast<acc_t>(x[off]) - mean[c]);
  }
};
template <typename acc_t>
struct SetMean {
  acc_t* mean;
  int64_t M;
  __device__ void operator()(int64_t c, const double* t) const { mean[c] = static_cast<acc_t>(t[0] / M); }
};
template <typename acc_t>
struct SetVariance {
  acc_t *var, *invstd;
  int64_t M;
  double eps;
  __device__ void operator()(int64_t c, const double* t) const {
    const double v = t[0] / M;
    var[c] = static_cast<acc_t>(v);
    invstd[c] = static_cast<acc_t>(1.0 / ::sqrt(v + eps));
  }
};
template <typename acc_t>
struct SetGradSums {
  acc_t *sum_dy, *sum_dy_xhat;
  const acc_t* invstd;
  __device__ void operator()(int64_t c, const double* t) const {
    sum_dy[c] = static_cast<acc_t>(t[0]);
    sum_dy_xhat[c] = static_cast<acc_t>(t[1] * static_cast<double>(invstd[c]));
  }
};

template <typename acc_t>
__global__ void eval_stats_kernel(const acc_t* running_mean, const acc_t* running_var, int64_t C, double eps,
                                  acc_t* mean, acc_t* invstd, acc_t* var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  mean[c] = running_mean[c];
  var[c] = running_var[c];
  invstd[c] = static_cast<acc_t>(1.0 / ::sqrt(static_cast<double>(running_var[c]) + eps));
}

// The element-wise kernels move V elements per load and store (16 bytes: Pack) where the channel
// runs allow it (planar: S % V == 0, so a pack lies in one channel; packed: C % V == 0, so a pack
// holds V consecutive channels) and the pointers are 16-byte aligned; else V = 1.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename scalar_t, typename acc_t, typename index_t, int V>
__global__ void apply_kernel(const scalar_t* x, const scalar_t* residual, scalar_t* out, Geometry g, int64_t numel,
                             const acc_t* mean, const acc_t* invstd, const acc_t* weight, const acc_t* bias,
                             bool relu) {
  using P = Pack<scalar_t, V>;
  const index_t packs = static_cast<index_t>(numel / V);
  for (index_t p = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t i = p * V, c0 = channel_of(g, i);
    const P xv = *reinterpret_cast<const P*>(x + i);
    P rv, ov;
    if (residual) rv = *reinterpret_cast<const P*>(residual + i);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const index_t c = g.planar ? c0 : c0 + e;
      const acc_t k = (weight ? weight[c] : acc_t(1)) * invstd[c];
      const acc_t t = (bias ? bias[c] : acc_t(0)) - mean[c] * k;
      const acc_t r = residual ? static_cast<acc_t>(rv.v[e]) : acc_t(0);
      ov.v[e] = static_cast<scalar_t>(bn_add_relu_forward(static_cast<acc_t>(xv.v[e]), r, k, t, relu));
    }
    *reinterpret_cast<P*>(out + i) = ov;
  }
}

template <typename scalar_t, typename acc_t, typename index_t, int V>
__global__ void input_grad_kernel(const scalar_t* grad_out, const scalar_t* out, const scalar_t* x, Geometry g,
                                  int64_t numel, const acc_t* mean, const acc_t* invstd, const acc_t* weight,
                                  const acc_t* sum_dy, const acc_t* sum_dy_xhat, bool training, bool relu,
                                  scalar_t* grad_input, scalar_t* grad_residual) {
  using P = Pack<scalar_t, V>;
  const acc_t inv_m = g.M > 0 ? acc_t(1) / static_cast<acc_t>(g.M) : acc_t(0);
  const index_t packs = static_cast<index_t>(numel / V);
  for (index_t p = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t i = p * V, c0 = channel_of(g, i);
    const P gv = *reinterpret_cast<const P*>(grad_out + i);
    const P ov = *reinterpret_cast<const P*>(out + i);
    const P xv = *reinterpret_cast<const P*>(x + i);
    P gi, gr;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const index_t c = g.planar ? c0 : c0 + e;
      const acc_t dy = relu_backward(static_cast<acc_t>(gv.v[e]), static_cast<acc_t>(ov.v[e]), relu);
      const acc_t k = (weight ? weight[c] : acc_t(1)) * invstd[c];
      gi.v[e] = static_cast<scalar_t>(bn_input_grad(dy, static_cast<acc_t>(xv.v[e]), mean[c], invstd[c], k,
                                                    sum_dy[c] * inv_m, sum_dy_xhat[c] * inv_m, training));
      gr.v[e] = static_cast<scalar_t>(dy);
    }
    *reinterpret_cast<P*>(grad_input + i) = gi;
    if (grad_residual) *reinterpret_cast<P*>(grad_residual + i) = gr;
  }
}

// Calls f(std::integral_constant<int, V>) with V = 16 / sizeof(scalar_t) when the layout and every
// pointer allow packs (see Pack), else with V = 1.
template <typename scalar_t, typename F>
void with_pack_width(const Geometry& g, std::initializer_list<const void*> ptrs, const F& f) {
  constexpr int kV = 16 / sizeof(scalar_t);
  bool ok = (g.planar ? g.S : g.C) % kV == 0;
  for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % 16 == 0;  // null is aligned
  if (ok) {
    f(std::integral_constant<int, kV>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Calls f(width, index) for an element-wise launch: the pack width (see with_pack_width) and the
// index type (see with_index_type) as compile-time tags.
template <typename scalar_t, typename F>
void with_elementwise_types(const Geometry& g, int64_t numel, std::initializer_list<const void*> ptrs, const F& f) {
  with_pack_width<scalar_t>(g, ptrs, [&](auto width) { with_index_type(numel, [&](auto index) { f(width, index); }); });
}

int elementwise_blocks(int64_t numel) {
  const int64_t blocks = (numel + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535));
}

Geometry geometry(const BnShape& s) { return {s.N, s.C, s.S, s.M, s.planar}; }

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_relu_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, bool relu) {
  check_bn_args("torchfast.bn_add_relu", input, weight, bias, residual, running_mean, running_var, training);
  const c10::cuda::CUDAGuard guard(input.device());
  BnForward f = prepare_bn_forward(input, weight, bias, residual, running_mean, running_var);
  const BnShape& sh = f.sh;
  const at::Tensor &x = f.x, &res = f.residual;
  at::Tensor &out = f.out, &mean = f.mean, &invstd = f.invstd, &var = f.var;
  const auto &w = f.weight, &b = f.bias, &rm = f.running_mean, &rv = f.running_var;
  if (sh.C == 0) return {out, mean, invstd, var};
  if (training && sh.M == 0) {
    set_empty_batch_stats(f, eps);
    return {out, mean, invstd, var};
  }
  const Geometry g = geometry(sh);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_add_relu_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    if (training) {
      // two passes (mean, then squared deviations), as on the CPU
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      acc_t* mp = mean.mutable_data_ptr<acc_t>();
      channel_sums<1>(g, SumInput<scalar_t, acc_t>{xp}, SetMean<acc_t>{mp, sh.M}, x, stream);
      channel_sums<1>(g, SumSquaredDeviation<scalar_t, acc_t>{xp, mp},
                      SetVariance<acc_t>{var.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>(), sh.M, eps},
                      x, stream);
    } else {
      tf_launch(eval_stats_kernel<acc_t>, (sh.C + 255) / 256, 256, 0, stream, rm->const_data_ptr<acc_t>(), rv->const_data_ptr<acc_t>(), sh.C, eps, mean.mutable_data_ptr<acc_t>(),
          invstd.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (x.numel() > 0) {
      const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      with_elementwise_types<scalar_t>(g, x.numel(), {x.const_data_ptr(), rp, op}, [&](auto width, auto index) {
        constexpr int V = decltype(width)::value;
        tf_launch(apply_kernel<scalar_t, acc_t, decltype(index), V>, elementwise_blocks(x.numel() / V), kThreads, 0,
                  stream, x.const_data_ptr<scalar_t>(), rp, op, g, x.numel(), mean.const_data_ptr<acc_t>(),
            invstd.const_data_ptr<acc_t>(), opt_ptr<acc_t>(w), opt_ptr<acc_t>(b), relu);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  });
  return {out, mean, invstd, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_relu_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& out, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, bool relu, bool has_residual) {
  check_bn_backward_args("torchfast.bn_add_relu_backward", grad_out, input, out, save_mean, save_invstd);
  const c10::cuda::CUDAGuard guard(input.device());
  BnBackward bw = prepare_bn_backward(grad_out, input, out, weight, save_mean, save_invstd, has_residual);
  const BnShape& sh = bw.sh;
  const at::Tensor &x = bw.x, &g_out = bw.grad_out, &o = bw.out, &mean = bw.mean, &invstd = bw.invstd;
  at::Tensor &gx = bw.grad_input, &gw = bw.grad_weight, &gb = bw.grad_bias, &gres = bw.grad_residual;
  const auto& w = bw.weight;
  if (sh.C == 0) return {gx, gw, gb, gres};
  const Geometry g = geometry(sh);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_add_relu_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    if (sh.M == 0) {
      gb.zero_();
      gw.zero_();
    } else {
      channel_sums<2>(g,
                      SumGradTerms<scalar_t, acc_t>{g_out.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
                                                    x.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(), relu},
                      SetGradSums<acc_t>{gb.mutable_data_ptr<acc_t>(), gw.mutable_data_ptr<acc_t>(),
                                         invstd.const_data_ptr<acc_t>()},
                      x, stream);
    }
    if (x.numel() > 0) {
      scalar_t* grp = has_residual ? gres.mutable_data_ptr<scalar_t>() : nullptr;
      const std::initializer_list<const void*> ptrs = {g_out.const_data_ptr(), o.const_data_ptr(), x.const_data_ptr(),
                                                        gx.const_data_ptr(), grp};
      with_elementwise_types<scalar_t>(g, x.numel(), ptrs, [&](auto width, auto index) {
        constexpr int V = decltype(width)::value;
        tf_launch(input_grad_kernel<scalar_t, acc_t, decltype(index), V>, elementwise_blocks(x.numel() / V), kThreads,
                  0, stream, g_out.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), g,
                x.numel(), mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), opt_ptr<acc_t>(w),
                gb.const_data_ptr<acc_t>(), gw.const_data_ptr<acc_t>(), training, relu, gx.mutable_data_ptr<scalar_t>(),
                grp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  });
  return {gx, gw, gb, gres};
}

}  // namespace

TF_CUDA_LIBRARY_IMPL(m) {
  m.impl("bn_add_relu", &bn_add_relu_cuda);
  m.impl("bn_add_relu_backward", &bn_add_relu_backward_cuda);
}

}  // namespace torchfast
