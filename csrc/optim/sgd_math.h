// SGD (momentum, dampening, Nesterov, weight decay, maximize) element math, shared by the CPU
// kernel (scalar and Vectorized) and the CUDA kernel. Order follows torch.optim.SGD's for-loop path.
#pragma once
#include "common/host_device.h"

namespace torchfast {

struct SgdHyper {
  double momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

// Everything the element update needs, in the compute type A (built once per call or block).
template <typename A>
struct SgdElementConsts {
  A momentum, one_minus_dampening, weight_decay, neg_lr;
  bool maximize, nesterov, has_weight_decay, has_momentum, first_step;
};

template <typename A>
C10_HOST_DEVICE inline SgdElementConsts<A> sgd_element_consts(const SgdHyper& h, double lr, bool first_step) {
  SgdElementConsts<A> c;
  c.momentum = A(h.momentum);
  c.one_minus_dampening = A(1.0 - h.dampening);
  c.weight_decay = A(h.weight_decay);
  c.neg_lr = A(-lr);
  c.maximize = h.maximize;
  c.nesterov = h.nesterov;
  c.has_weight_decay = h.weight_decay != 0;
  c.has_momentum = h.momentum != 0;
  c.first_step = first_step;
  return c;
}

// grad arrives unscaled. On the first step the momentum buffer is uninitialised and takes the grad.
template <typename T, typename A>
C10_HOST_DEVICE inline void sgd_update(T& param, T grad, T& momentum_buffer, const SgdElementConsts<A>& c) {
  if (c.maximize) grad = T(A(0)) - grad;
  if (c.has_weight_decay) grad = grad + T(c.weight_decay) * param;
  if (c.has_momentum) {
    if (c.first_step) {
      momentum_buffer = grad;
    } else {
      momentum_buffer = momentum_buffer * T(c.momentum) + T(c.one_minus_dampening) * grad;
    }
    grad = c.nesterov ? grad + T(c.momentum) * momentum_buffer : momentum_buffer;
  }
  param = param + T(c.neg_lr) * grad;
}

}  // namespace torchfast
