// SGD (momentum, dampening, Nesterov, weight decay, maximize) element math, shared by the CPU
// kernel (scalar and Vectorized) and the CUDA kernel. Order follows torch.optim.SGD's for-loop path.
#pragma once
#include "common/host_device.h"

namespace torchfast {

struct SgdHyper {
  double momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

// grad arrives unscaled. first_step: the momentum buffer is uninitialised and takes the gradient.
template <typename T>
C10_HOST_DEVICE inline void sgd_update(T& param, T grad, T& momentum_buffer, const SgdHyper& h, double lr,
                                       bool first_step) {
  if (h.maximize) grad = T(0) - grad;
  if (h.weight_decay != 0) grad = grad + T(h.weight_decay) * param;
  if (h.momentum != 0) {
    if (first_step) {
      momentum_buffer = grad;
    } else {
      momentum_buffer = momentum_buffer * T(h.momentum) + T(1.0 - h.dampening) * grad;
    }
    grad = h.nesterov ? grad + T(h.momentum) * momentum_buffer : momentum_buffer;
  }
  param = param + T(-lr) * grad;
}

}  // namespace torchfast
