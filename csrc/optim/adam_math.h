// Adam / AdamW element math, shared by the CPU kernel (scalar and Vectorized) and the CUDA kernel.
// Operation order follows torch.optim.Adam's for-loop implementation, with fp32 constants, so that
// fp32 results agree with it to rounding.
#pragma once
#include "common/host_device.h"

namespace torchfast {

struct AdamHyper {
  double lr, beta1, beta2, weight_decay, eps;
  bool amsgrad, maximize, decoupled_weight_decay;
};

// Per-parameter constants that depend on its step count (1-based, after the increment).
struct AdamStepCoeffs {
  double step_size;  // lr / (1 - beta1^t)
  double bc2_sqrt;   // sqrt(1 - beta2^t)
};

C10_HOST_DEVICE inline AdamStepCoeffs adam_step_coeffs(const AdamHyper& h, double lr, double step) {
  AdamStepCoeffs c;
  c.step_size = lr / (1.0 - ::pow(h.beta1, step));
  c.bc2_sqrt = ::sqrt(1.0 - ::pow(h.beta2, step));
  return c;
}

// One element (or one vector of elements) of the update. grad arrives unscaled.
template <typename T>
C10_HOST_DEVICE inline void adam_update(T& param, T grad, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq,
                                        const AdamHyper& h, double lr, const AdamStepCoeffs& c) {
  if (h.maximize) grad = T(0) - grad;
  if (h.weight_decay != 0) {
    if (h.decoupled_weight_decay) {
      param = param * T(1.0 - lr * h.weight_decay);
    } else {
      grad = grad + T(h.weight_decay) * param;
    }
  }
  // exp_avg.lerp_(grad, 1 - beta1), with torch's two-sided lerp formula.
  const double w = 1.0 - h.beta1;
  if (w < 0.5) {
    exp_avg = exp_avg + T(w) * (grad - exp_avg);
  } else {
    exp_avg = grad - (grad - exp_avg) * T(1.0 - w);
  }
  exp_avg_sq = exp_avg_sq * T(h.beta2) + T(1.0 - h.beta2) * grad * grad;
  T second = exp_avg_sq;
  if (h.amsgrad) {
    max_exp_avg_sq = tf_max(max_exp_avg_sq, exp_avg_sq);
    second = max_exp_avg_sq;
  }
  const T denom = tf_sqrt(second) / T(c.bc2_sqrt) + T(h.eps);
  param = param + T(-c.step_size) * exp_avg / denom;
}

}  // namespace torchfast
