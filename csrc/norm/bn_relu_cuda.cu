// CUDA kernels of torchfast::bn_add_relu and torchfast::bn_add_relu_backward.
//
// Kept simple until a GPU has run them: one block per channel for the statistics and the
// backward sums (two passes, block reductions in the compute type, combined in double), and
// grid-stride element-wise kernels for the output and the input gradient, all through the math
// shared with the CPU kernel (norm/bn_relu_math.h). Planar (N, C, S) reads are coalesced; packed
// channels_last reads in the per-channel passes are strided (correct, not yet fast).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_reduce.cuh"
#include "common/host_device.h"
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

// Offset of element i (0 <= i < M) of channel c.
__device__ inline int64_t channel_offset(const Geometry& g, int64_t c, int64_t i) {
  return g.planar ? ((i / g.S) * g.C + c) * g.S + (i % g.S) : i * g.C + c;
}

// Channel of the element at flat offset `off`.
__device__ inline int64_t channel_of(const Geometry& g, int64_t off) {
  return g.planar ? (off / g.S) % g.C : off % g.C;
}

__device__ inline double add_op(double a, double b) { return a + b; }

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const scalar_t* x, Geometry g, double eps, acc_t* mean, acc_t* invstd, acc_t* var) {
  const int64_t c = blockIdx.x;
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < g.M; i += blockDim.x) s += static_cast<acc_t>(x[channel_offset(g, c, i)]);
  const double mu = block_reduce<kThreads>(static_cast<double>(s), add_op) / static_cast<double>(g.M);
  acc_t q = 0;
  const acc_t mu_a = static_cast<acc_t>(mu);
  for (int64_t i = threadIdx.x; i < g.M; i += blockDim.x) {
    const acc_t d = static_cast<acc_t>(x[channel_offset(g, c, i)]) - mu_a;
    q += d * d;
  }
  const double v = block_reduce<kThreads>(static_cast<double>(q), add_op) / static_cast<double>(g.M);
  if (threadIdx.x == 0) {
    mean[c] = mu_a;
    var[c] = static_cast<acc_t>(v);
    invstd[c] = static_cast<acc_t>(1.0 / ::sqrt(v + eps));
  }
}

template <typename acc_t>
__global__ void eval_stats_kernel(const acc_t* running_mean, const acc_t* running_var, int64_t C, double eps,
                                  acc_t* mean, acc_t* invstd, acc_t* var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  mean[c] = running_mean[c];
  var[c] = running_var[c];
  invstd[c] = static_cast<acc_t>(1.0 / ::sqrt(static_cast<double>(running_var[c]) + eps));
}

template <typename scalar_t, typename acc_t>
__global__ void apply_kernel(const scalar_t* x, const scalar_t* residual, scalar_t* out, Geometry g, int64_t numel,
                             const acc_t* mean, const acc_t* invstd, const acc_t* weight, const acc_t* bias,
                             bool relu) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of(g, i);
    const acc_t k = (weight ? weight[c] : acc_t(1)) * invstd[c];
    const acc_t t = (bias ? bias[c] : acc_t(0)) - mean[c] * k;
    const acc_t r = residual ? static_cast<acc_t>(residual[i]) : acc_t(0);
    out[i] = static_cast<scalar_t>(bn_add_relu_forward(static_cast<acc_t>(x[i]), r, k, t, relu));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_sums_kernel(const scalar_t* grad_out, const scalar_t* out, const scalar_t* x, Geometry g,
                         const acc_t* mean, const acc_t* invstd, bool relu, acc_t* sum_dy, acc_t* sum_dy_xhat) {
  const int64_t c = blockIdx.x;
  const acc_t mu = mean[c];
  acc_t s0 = 0, s1 = 0;
  for (int64_t i = threadIdx.x; i < g.M; i += blockDim.x) {
    const int64_t off = channel_offset(g, c, i);
    const acc_t dy = relu_backward(static_cast<acc_t>(grad_out[off]), static_cast<acc_t>(out[off]), relu);
    s0 += dy;
    s1 += dy * (static_cast<acc_t>(x[off]) - mu);
  }
  const double t0 = block_reduce<kThreads>(static_cast<double>(s0), add_op);
  const double t1 = block_reduce<kThreads>(static_cast<double>(s1), add_op);
  if (threadIdx.x == 0) {
    sum_dy[c] = static_cast<acc_t>(t0);
    sum_dy_xhat[c] = static_cast<acc_t>(t1 * static_cast<double>(invstd[c]));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void input_grad_kernel(const scalar_t* grad_out, const scalar_t* out, const scalar_t* x, Geometry g,
                                  int64_t numel, const acc_t* mean, const acc_t* invstd, const acc_t* weight,
                                  const acc_t* sum_dy, const acc_t* sum_dy_xhat, bool training, bool relu,
                                  scalar_t* grad_input, scalar_t* grad_residual) {
  const acc_t inv_m = g.M > 0 ? acc_t(1) / static_cast<acc_t>(g.M) : acc_t(0);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of(g, i);
    const acc_t dy = relu_backward(static_cast<acc_t>(grad_out[i]), static_cast<acc_t>(out[i]), relu);
    const acc_t k = (weight ? weight[c] : acc_t(1)) * invstd[c];
    grad_input[i] = static_cast<scalar_t>(bn_input_grad(dy, static_cast<acc_t>(x[i]), mean[c], invstd[c], k,
                                                        sum_dy[c] * inv_m, sum_dy_xhat[c] * inv_m, training));
    if (grad_residual) grad_residual[i] = static_cast<scalar_t>(dy);
  }
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
  const Geometry g = geometry(sh);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_add_relu_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    if (training) {
      if (sh.M > 0) {
        stats_kernel<scalar_t, acc_t><<<sh.C, kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), g, eps, mean.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>(),
            var.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    } else {
      eval_stats_kernel<acc_t><<<(sh.C + 255) / 256, 256, 0, stream>>>(
          rm->const_data_ptr<acc_t>(), rv->const_data_ptr<acc_t>(), sh.C, eps, mean.mutable_data_ptr<acc_t>(),
          invstd.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (x.numel() > 0) {
      apply_kernel<scalar_t, acc_t><<<elementwise_blocks(x.numel()), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), res.defined() ? res.const_data_ptr<scalar_t>() : nullptr,
          out.mutable_data_ptr<scalar_t>(), g, x.numel(), mean.const_data_ptr<acc_t>(),
          invstd.const_data_ptr<acc_t>(), opt_ptr<acc_t>(w), opt_ptr<acc_t>(b), relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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
    backward_sums_kernel<scalar_t, acc_t><<<sh.C, kThreads, 0, stream>>>(
        g_out.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), g,
        mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), relu, gb.mutable_data_ptr<acc_t>(),
        gw.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (x.numel() > 0) {
      input_grad_kernel<scalar_t, acc_t><<<elementwise_blocks(x.numel()), kThreads, 0, stream>>>(
          g_out.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), g,
          x.numel(), mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), opt_ptr<acc_t>(w),
          gb.const_data_ptr<acc_t>(), gw.const_data_ptr<acc_t>(), training, relu, gx.mutable_data_ptr<scalar_t>(),
          has_residual ? gres.mutable_data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gx, gw, gb, gres};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CUDA, m) {
  m.impl("bn_add_relu", &bn_add_relu_cuda);
  m.impl("bn_add_relu_backward", &bn_add_relu_backward_cuda);
}

}  // namespace torchfast
