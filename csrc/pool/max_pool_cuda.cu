// CUDA kernels of torchfast::relu_max_pool2d and torchfast::relu_max_pool2d_backward.
//
// Forward: one thread per output element (consecutive threads take consecutive channels in
// channels_last, consecutive columns in NCHW: coalesced either way), the window walked in the
// math shared with the CPU kernel (pool/max_pool_math.h). Backward: one thread per input element,
// gathering the gradients of the windows that picked it: no atomics, no zero fill, deterministic
// where windows overlap.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/host_device.h"
#include "common/launch.cuh"
#include "pool/max_pool_checks.h"
#include "pool/max_pool_math.h"

namespace torchfast {
namespace {

constexpr int kThreads = 256;

// (n, c, h, w) of flat offset i of an (N, C, sizes_h, sizes_w) tensor in the geometry's layout.
template <typename index_t>
__device__ inline void unflatten(index_t i, const PoolGeometry& g, index_t sizes_h, index_t sizes_w, index_t& n,
                                 index_t& c, index_t& h, index_t& w) {
  const index_t C = static_cast<index_t>(g.C);
  if (g.channels_last) {
    c = i % C;
    i /= C;
    w = i % sizes_w;
    i /= sizes_w;
    h = i % sizes_h;
    n = i / sizes_h;
  } else {
    w = i % sizes_w;
    i /= sizes_w;
    h = i % sizes_h;
    i /= sizes_h;
    c = i % C;
    n = i / C;
  }
}

template <typename index_t>
__device__ inline index_t flatten(const PoolGeometry& g, index_t sizes_h, index_t sizes_w, index_t n, index_t c,
                                  index_t h, index_t w) {
  const index_t C = static_cast<index_t>(g.C);
  return g.channels_last ? ((n * sizes_h + h) * sizes_w + w) * C + c : ((n * C + c) * sizes_h + h) * sizes_w + w;
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    pool_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, uint8_t* __restrict__ argmax,
                        PoolGeometry g, index_t total, bool relu) {
  using acc_t = acc_type_t<scalar_t>;
  const index_t H = static_cast<index_t>(g.H), W = static_cast<index_t>(g.W);
  const index_t OH = static_cast<index_t>(g.OH), OW = static_cast<index_t>(g.OW);
  for (index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<index_t>(gridDim.x) * kThreads) {
    index_t n, c, oh, ow;
    unflatten(i, g, OH, OW, n, c, oh, ow);
    const int64_t h0 = static_cast<int64_t>(oh) * g.sh - g.ph, w0 = static_cast<int64_t>(ow) * g.sw - g.pw;
    const int64_t hs = h0 < 0 ? 0 : h0, ws = w0 < 0 ? 0 : w0;
    const int64_t he = h0 + g.kh < g.H ? h0 + g.kh : g.H, we = w0 + g.kw < g.W ? w0 + g.kw : g.W;
    acc_t best = -std::numeric_limits<acc_t>::infinity();
    int where = static_cast<int>((hs - h0) * g.kw + (ws - w0));
    for (int64_t ih = hs; ih < he; ++ih)
      for (int64_t iw = ws; iw < we; ++iw) {
        const acc_t v = static_cast<acc_t>(
            x[flatten(g, H, W, n, c, static_cast<index_t>(ih), static_cast<index_t>(iw))]);
        if (pool_takes(v, best)) {
          best = v;
          where = static_cast<int>((ih - h0) * g.kw + (iw - w0));
        }
      }
    out[i] = static_cast<scalar_t>(pool_relu(best, relu));
    argmax[i] = static_cast<uint8_t>(where);
  }
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    pool_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                         const uint8_t* __restrict__ argmax, scalar_t* __restrict__ grad_in, PoolGeometry g,
                         index_t total, bool relu) {
  using acc_t = acc_type_t<scalar_t>;
  const index_t H = static_cast<index_t>(g.H), W = static_cast<index_t>(g.W);
  const index_t OH = static_cast<index_t>(g.OH), OW = static_cast<index_t>(g.OW);
  for (index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<index_t>(gridDim.x) * kThreads) {
    index_t n, c, ih, iw;
    unflatten(i, g, H, W, n, c, ih, iw);
    int64_t fh, lh, fw, lw;
    pool_windows_of(static_cast<int64_t>(ih), g.kh, g.sh, g.ph, g.OH, fh, lh);
    pool_windows_of(static_cast<int64_t>(iw), g.kw, g.sw, g.pw, g.OW, fw, lw);
    acc_t sum = acc_t(0);
    for (int64_t oh = fh; oh <= lh; ++oh)
      for (int64_t ow = fw; ow <= lw; ++ow) {
        const index_t q = flatten(g, OH, OW, n, c, static_cast<index_t>(oh), static_cast<index_t>(ow));
        const int off = static_cast<int>((static_cast<int64_t>(ih) - (oh * g.sh - g.ph)) * g.kw +
                                         (static_cast<int64_t>(iw) - (ow * g.sw - g.pw)));
        if (static_cast<int>(argmax[q]) == off)
          sum += pool_grad_through_relu(static_cast<acc_t>(grad_out[q]), static_cast<acc_t>(out[q]), relu);
      }
    grad_in[i] = static_cast<scalar_t>(sum);
  }
}

int blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535));
}

// f(index_t{}): 32-bit indexing below 2^31 elements (the grid-stride increment, at most
// 65535 x 256, cannot wrap a uint32_t then), else 64-bit.
template <typename F>
void with_pool_index_type(int64_t numel, const F& f) {
  if (numel < (int64_t(1) << 31)) {
    f(uint32_t{});
  } else {
    f(int64_t{});
  }
}

std::tuple<at::Tensor, at::Tensor> relu_max_pool2d_cuda(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                        at::IntArrayRef stride, at::IntArrayRef padding, bool relu) {
  constexpr const char* op = "torchfast.relu_max_pool2d";
  check_pool_input(op, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool cl = is_channels_last_4d(input);
  const PoolGeometry g = pool_geometry(op, input.sizes(), kernel_size, stride, padding, cl);
  const at::MemoryFormat fmt = pool_memory_format(cl);
  const at::Tensor x = input.contiguous(fmt);
  at::Tensor out = at::empty({g.N, g.C, g.OH, g.OW}, x.options(), fmt);
  at::Tensor argmax = at::empty({g.N, g.C, g.OH, g.OW}, x.options().dtype(at::kByte), fmt);
  const int64_t total = out.numel();
  if (total == 0) return {out, argmax};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "relu_max_pool2d_cuda", [&] {
    with_pool_index_type(std::max(total, x.numel()), [&](auto index) {
      using index_t = decltype(index);
      tf_launch(pool_forward_kernel<scalar_t, index_t>, blocks_for(total), kThreads, 0, stream,
                x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), argmax.mutable_data_ptr<uint8_t>(), g,
                static_cast<index_t>(total), relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, argmax};
}

at::Tensor relu_max_pool2d_backward_cuda(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& argmax,
                                         at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                         at::IntArrayRef stride, at::IntArrayRef padding, bool relu,
                                         bool channels_last) {
  constexpr const char* op = "torchfast.relu_max_pool2d_backward";
  check_pool_input(op, out);
  const c10::cuda::CUDAGuard guard(out.device());
  const PoolGeometry g = pool_geometry(op, input_size, kernel_size, stride, padding, channels_last);
  check_pool_backward(op, grad_out, out, argmax, g);
  const at::MemoryFormat fmt = pool_memory_format(channels_last);
  const at::Tensor go = grad_out.contiguous(fmt), o = out.contiguous(fmt), a = argmax.contiguous(fmt);
  at::Tensor grad_in = at::empty(input_size, o.options(), fmt);
  const int64_t total = grad_in.numel();
  if (total == 0) return grad_in;
  if (o.numel() == 0) return grad_in.zero_();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "relu_max_pool2d_backward_cuda", [&] {
    with_pool_index_type(std::max(total, o.numel()), [&](auto index) {
      using index_t = decltype(index);
      tf_launch(pool_backward_kernel<scalar_t, index_t>, blocks_for(total), kThreads, 0, stream,
                go.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), a.const_data_ptr<uint8_t>(),
                grad_in.mutable_data_ptr<scalar_t>(), g, static_cast<index_t>(total), relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_in;
}

}  // namespace

TF_CUDA_LIBRARY_IMPL(m) {
  m.impl("relu_max_pool2d", &relu_max_pool2d_cuda);
  m.impl("relu_max_pool2d_backward", &relu_max_pool2d_backward_cuda);
}

}  // namespace torchfast
