// Argument validation of the bn_add_relu ops (CPU and CUDA).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace torchfast {

inline void check_channel_param(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t C,
                                const at::Tensor& input) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->numel() == C, op, ": ", name, " must have shape [", C,
              "] (the input's channels), got ", t->sizes());
  TORCH_CHECK(t->device() == input.device(), op, ": ", name, " is on ", t->device(), " but input is on ",
              input.device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", name, " must be floating point, got ",
              t->scalar_type());
}

inline void check_bn_args(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                          const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                          bool training) {
  TORCH_CHECK(input.dim() >= 2, op, ": input must be (N, C, *), got shape ", input.sizes());
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": input has dtype ", dt, "; supported: float32, float16, bfloat16, float64");
  const int64_t C = input.size(1);
  check_channel_param(op, "weight", weight, C, input);
  check_channel_param(op, "bias", bias, C, input);
  check_channel_param(op, "running_mean", running_mean, C, input);
  check_channel_param(op, "running_var", running_var, C, input);
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == input.sizes(), op, ": residual has shape ", residual->sizes(),
                " but input has shape ", input.sizes());
    TORCH_CHECK(residual->device() == input.device(), op, ": residual is on ", residual->device(),
                " but input is on ", input.device());
  }
  if (training) {
    TORCH_CHECK(input.numel() / std::max<int64_t>(C, 1) > 1 || input.numel() == 0, op,
                ": expected more than 1 value per channel when training, got input of shape ", input.sizes());
  } else {
    TORCH_CHECK(running_mean.has_value() && running_mean->defined() && running_var.has_value() &&
                    running_var->defined(),
                op, ": eval mode needs running_mean and running_var");
  }
}

inline void check_bn_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& input,
                                   const at::Tensor& out, const at::Tensor& save_mean, const at::Tensor& save_invstd) {
  TORCH_CHECK(grad_out.sizes() == input.sizes() && out.sizes() == input.sizes(), op, ": grad_out ", grad_out.sizes(),
              ", out ", out.sizes(), " and input ", input.sizes(), " must have one shape");
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type() && out.scalar_type() == input.scalar_type(), op,
              ": grad_out, out and input must have one dtype, got ", grad_out.scalar_type(), ", ",
              out.scalar_type(), ", ", input.scalar_type());
  const int64_t C = input.size(1);
  TORCH_CHECK(save_mean.numel() == C && save_invstd.numel() == C, op, ": save_mean/save_invstd must hold ", C,
              " values (the input's channels), got ", save_mean.sizes(), " and ", save_invstd.sizes());
}

}  // namespace torchfast
