// How the bn_add_relu kernels (CPU and CUDA) see their tensors: planar (N, C, S) for contiguous
// inputs, packed (M, C) rows for channels_last and 2-D inputs; anything else is made contiguous.
// Per-channel tensors (weight, bias, statistics) are read in the statistics dtype (fp32, fp64 for
// fp64 inputs); tensors that go with the input (residual, grad_out, out) in the input's layout.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

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
  return at::empty_like(x).copy_(t);
}

}  // namespace torchfast
