// How the bn_add_relu kernels (CPU and CUDA) see their tensors: planar (N, C, S) for contiguous
// inputs, packed (M, C) rows for channels_last and 2-D inputs; anything else is made contiguous.
// Per-channel tensors (weight, bias, statistics) are read in the statistics dtype (fp32, fp64 for
// fp64 inputs); tensors that go with the input (residual, grad_out, out) in the input's layout.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <optional>

namespace torchfast {

struct BnShape {
  bool planar;  // (N, C, S) contiguous; else packed (M, C) rows
  int64_t N, C, S, M;
};

// The layout the kernels read: the input's own when planar or packed, else a contiguous copy.
inline at::Tensor bn_kernel_layout(const at::Tensor& x, BnShape& shape) {
  const auto cl = x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  at::Tensor t;
  if (x.dim() == 2 && x.is_contiguous()) {
    shape.planar = false;  // (N, C) rows
    t = x;
  } else if ((x.dim() == 4 || x.dim() == 5) && !x.is_contiguous() && x.is_contiguous(cl)) {
    shape.planar = false;
    t = x;
  } else {
    shape.planar = true;
    t = x.contiguous();
  }
  shape.N = t.size(0);
  shape.C = t.size(1);
  shape.M = shape.C > 0 ? t.numel() / shape.C : 0;
  shape.S = shape.N > 0 ? shape.M / shape.N : 0;
  // One element per (n, c) plane (N, C, 1, 1): the same memory as (N, C) rows, which the packed
  // kernels read along the channels instead of with stride C.
  if (shape.planar && shape.S == 1) shape.planar = false;
  return t;
}

inline at::ScalarType bn_stat_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline std::optional<at::Tensor> bn_channel_tensor(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->to(dtype).contiguous();
}

// `t` (same shape as x) with x's dtype and strides: itself when it already has them.
inline at::Tensor bn_like_input(const at::Tensor& t, const at::Tensor& x) {
  if (t.scalar_type() == x.scalar_type() && t.strides() == x.strides()) return t;
  // One value broadcast everywhere (the grad of out.sum() or out.mean()): a fill writes it at memory
  // speed, where copying from a stride-0 tensor takes the slow element-wise path.
  bool broadcast_scalar = t.numel() > 0;
  for (const int64_t st : t.strides()) broadcast_scalar = broadcast_scalar && st == 0;
  if (broadcast_scalar) {
    const at::Tensor value = t.as_strided({}, {}, t.storage_offset());
    // On the CPU, fill with the number (a tensor value takes the broadcast-copy path again);
    // on CUDA keep it a device tensor (no host sync).
    return x.is_cpu() ? at::empty_like(x).fill_(value.item()) : at::empty_like(x).fill_(value);
  }
  return at::empty_like(x).copy_(t);
}

// The forward's inputs in kernel layout, and its outputs allocated (out in x's layout; mean,
// invstd and var per channel in the statistics dtype).
struct BnForward {
  BnShape sh;
  at::Tensor x, residual, out, mean, invstd, var;  // residual undefined when absent
  std::optional<at::Tensor> weight, bias, running_mean, running_var;
};

inline BnForward prepare_bn_forward(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                    const std::optional<at::Tensor>& running_mean,
                                    const std::optional<at::Tensor>& running_var) {
  BnForward f;
  f.x = bn_kernel_layout(input, f.sh);
  const at::ScalarType stat = bn_stat_dtype(input);
  f.weight = bn_channel_tensor(weight, stat);
  f.bias = bn_channel_tensor(bias, stat);
  f.running_mean = bn_channel_tensor(running_mean, stat);
  f.running_var = bn_channel_tensor(running_var, stat);
  if (residual.has_value() && residual->defined()) f.residual = bn_like_input(*residual, f.x);
  f.out = at::empty_like(f.x);
  const auto opts = input.options().dtype(stat);
  f.mean = at::empty({f.sh.C}, opts);
  f.invstd = at::empty({f.sh.C}, opts);
  f.var = at::empty({f.sh.C}, opts);
  return f;
}

// Batch statistics of an empty batch (M == 0): mean 0, variance 0 (the caller leaves the running
// statistics alone), rather than 0 / 0.
inline void set_empty_batch_stats(BnForward& f, double eps) {
  f.mean.zero_();
  f.var.zero_();
  f.invstd.fill_(1.0 / std::sqrt(eps));
}

// The backward's inputs in kernel layout, and its outputs allocated (grad_residual empty when
// there is no residual).
struct BnBackward {
  BnShape sh;
  at::Tensor grad_out, x, out, mean, invstd, grad_input, grad_weight, grad_bias, grad_residual;
  std::optional<at::Tensor> weight;
};

inline BnBackward prepare_bn_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& out,
                                      const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                                      const at::Tensor& save_invstd, bool has_residual) {
  BnBackward b;
  b.x = bn_kernel_layout(input, b.sh);
  b.grad_out = bn_like_input(grad_out, b.x);
  b.out = bn_like_input(out, b.x);
  b.weight = bn_channel_tensor(weight, save_mean.scalar_type());
  b.mean = save_mean.contiguous();
  b.invstd = save_invstd.contiguous();
  b.grad_input = at::empty_like(b.x);
  b.grad_weight = at::empty({b.sh.C}, b.mean.options());
  b.grad_bias = at::empty({b.sh.C}, b.mean.options());
  b.grad_residual = has_residual ? at::empty_like(b.x) : at::empty({0}, b.x.options());
  return b;
}

}  // namespace torchfast
