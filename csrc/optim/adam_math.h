// Adam / AdamW element math, shared by the CPU kernel (scalar and Vectorized) and the CUDA kernel.
// Operation order follows torch.optim.Adam's for-loop implementation, with constants rounded to the
// compute type as torch rounds its Python scalars, so that fp32 results agree with it to rounding.
#pragma once
#include "common/host_device.h"

namespace torchfast {

struct AdamHyper {
  double lr, beta1, beta2, weight_decay, eps;
  bool amsgrad, maximize, decoupled_weight_decay;
};

// Everything the element update needs for one tensor at one step, in the compute type A. Built
// once per tensor (CPU) or block (CUDA) so that the element loop only broadcasts.
template <typename A>
struct AdamElementConsts {
  A lerp_weight, one_minus_lerp_weight;  // exp_avg.lerp_(grad, 1 - beta1)
  A beta2, one_minus_beta2, weight_decay, param_decay, eps, neg_step_size, bc2_sqrt;
  bool maximize, amsgrad, decoupled, has_weight_decay, lerp_from_start;
};

// step: the step count after this step's increment (1 on the first step).
template <typename A>
C10_HOST_DEVICE inline AdamElementConsts<A> adam_element_consts(const AdamHyper& h, double lr, double step) {
  AdamElementConsts<A> c;
  const double w = 1.0 - h.beta1;
  c.lerp_weight = A(w);
  c.one_minus_lerp_weight = A(1) - A(w);
  c.lerp_from_start = w < 0.5;  // torch's lerp: the formula that is exact at its nearer end
  c.beta2 = A(h.beta2);
  c.one_minus_beta2 = A(1.0 - h.beta2);
  c.weight_decay = A(h.weight_decay);
  c.param_decay = A(1.0 - lr * h.weight_decay);
  c.eps = A(h.eps);
  c.neg_step_size = A(-(lr / (1.0 - ::pow(h.beta1, step))));
  c.bc2_sqrt = A(::sqrt(1.0 - ::pow(h.beta2, step)));
  c.maximize = h.maximize;
  c.amsgrad = h.amsgrad;
  c.decoupled = h.decoupled_weight_decay;
  c.has_weight_decay = h.weight_decay != 0;
  return c;
}

// One element (or one vector of elements) of the update. grad arrives unscaled.
template <typename T, typename A>
C10_HOST_DEVICE inline void adam_update(T& param, T grad, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq,
                                        const AdamElementConsts<A>& c) {
  if (c.maximize) grad = T(A(0)) - grad;
  if (c.has_weight_decay) {
    if (c.decoupled) {
      param = param * T(c.param_decay);
    } else {
      grad = grad + T(c.weight_decay) * param;
    }
  }
  if (c.lerp_from_start) {
    exp_avg = exp_avg + T(c.lerp_weight) * (grad - exp_avg);
  } else {
    exp_avg = grad - (grad - exp_avg) * T(c.one_minus_lerp_weight);
  }
  exp_avg_sq = exp_avg_sq * T(c.beta2) + T(c.one_minus_beta2) * grad * grad;
  T second = exp_avg_sq;
  if (c.amsgrad) {
    max_exp_avg_sq = tf_max(max_exp_avg_sq, exp_avg_sq);
    second = max_exp_avg_sq;
  }
  const T denom = tf_sqrt(second) / T(c.bc2_sqrt) + T(c.eps);
  param = param + T(c.neg_step_size) * exp_avg / denom;
}

}  // namespace torchfast
