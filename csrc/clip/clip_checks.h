// Argument validation of the clipping ops, shared by their CPU and CUDA kernels.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "clip/grad_norm_math.h"

namespace torchfast {

inline void check_float_list(const char* op, const char* name, at::TensorList tensors) {
  if (tensors.empty()) return;
  const at::Device device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined() && t.layout() == at::kStrided, op, ": ", name, "[", i,
                "] must be a dense tensor (sparse gradients are not supported)");
    TORCH_CHECK(t.device() == device, op, ": all tensors of one call must be on one device; ", name,
                "[0] is on ", device, " but ", name, "[", i, "] is on ", t.device());
    const auto dt = t.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op, ": ", name,
                "[", i, "] has dtype ", dt, "; supported: float32, float16, bfloat16, float64");
  }
}

inline NormKind check_total_norm_args(const char* op, at::TensorList tensors, double norm_type) {
  check_float_list(op, "tensors", tensors);
  TORCH_CHECK(!tensors.empty(), op, ": needs at least one tensor (the norm of nothing is 0: handled by the caller)");
  if (norm_type == 2.0) return NormKind::kTwo;
  if (norm_type == 1.0) return NormKind::kOne;
  TORCH_CHECK(std::isinf(norm_type) && norm_type > 0, op, ": norm_type must be 1, 2 or inf, got ", norm_type);
  return NormKind::kInf;
}

// The dtype torch gives the total norm: that of the per-tensor norms (each tensor's dtype), promoted.
inline at::ScalarType norm_result_dtype(at::TensorList tensors) {
  at::ScalarType dt = tensors[0].scalar_type();
  for (const at::Tensor& t : tensors) dt = c10::promoteTypes(dt, t.scalar_type());
  return dt;
}

inline void check_clip_args(const char* op, at::TensorList grads, const at::Tensor& total_norm) {
  check_float_list(op, "grads", grads);
  TORCH_CHECK(total_norm.numel() == 1, op, ": total_norm must hold one value, got shape ", total_norm.sizes());
  if (!grads.empty())
    TORCH_CHECK(total_norm.device() == grads[0].device(), op, ": total_norm is on ", total_norm.device(),
                " but the grads are on ", grads[0].device());
}

}  // namespace torchfast
