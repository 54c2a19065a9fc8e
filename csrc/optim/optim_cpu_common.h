// Host-side argument handling shared by the CPU optimizer kernels.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace torchfast {

// The learning rate, a float or a one-element tensor (LR schedulers may hold a tensor).
inline double resolve_lr(const char* op, double lr, const std::optional<at::Tensor>& lr_tensor) {
  if (!lr_tensor.has_value() || !lr_tensor->defined()) return lr;
  TORCH_CHECK(lr_tensor->numel() == 1, op, ": lr_tensor must hold one value, got shape ", lr_tensor->sizes());
  return lr_tensor->item<double>();
}

// GradScaler protocol: returns true when found_inf says this step must be skipped, and sets
// inv_scale to 1 / grad_scale (1 without a scaler).
inline bool resolve_amp(const char* op, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf, double& scale, bool& has_scale) {
  has_scale = grad_scale.has_value() && grad_scale->defined();
  scale = 1.0;
  if (has_scale) {
    TORCH_CHECK(grad_scale->numel() == 1, op, ": grad_scale must hold one value, got shape ", grad_scale->sizes());
    scale = grad_scale->item<double>();
  }
  if (found_inf.has_value() && found_inf->defined()) {
    TORCH_CHECK(found_inf->numel() == 1, op, ": found_inf must hold one value, got shape ", found_inf->sizes());
    return found_inf->item<double>() != 0.0;
  }
  return false;
}

// The clip coefficient multiplying the (unscaled) grads inside the update; 1 without clipping.
inline double resolve_clip(const char* op, const std::optional<at::Tensor>& clip_coef) {
  if (!clip_coef.has_value() || !clip_coef->defined()) return 1.0;
  TORCH_CHECK(clip_coef->numel() == 1, op, ": clip_coef must hold one value, got shape ", clip_coef->sizes());
  return clip_coef->item<double>();
}

// Reads and increments a step counter in place (float32 or float64 scalar on the CPU).
inline double increment_step(const at::Tensor& step) {
  if (step.scalar_type() == at::kDouble) {
    double* p = step.data_ptr<double>();
    return *p += 1.0;
  }
  float* p = step.data_ptr<float>();
  return *p += 1.0f;
}

}  // namespace torchfast
