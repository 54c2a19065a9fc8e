// Autograd-key kernels of the optimizer ops: see common/inplace_autograd.h.
#include <torch/library.h>

#include "common/inplace_autograd.h"

namespace torchfast {
namespace {

using OptTensor = const std::optional<at::Tensor>&;
using AdamSig = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                     double, double, double, double, double, bool, bool, bool, OptTensor, OptTensor, OptTensor,
                     OptTensor);
using SgdSig = void(at::TensorList, at::TensorList, at::TensorList, double, double, double, double, bool, bool, bool,
                    OptTensor, OptTensor, OptTensor, OptTensor);

void fused_adam_autograd(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                         double lr, double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                         bool maximize, bool decoupled_weight_decay, OptTensor lr_tensor, OptTensor grad_scale,
                         OptTensor found_inf, OptTensor clip_coef) {
  check_not_grad_mode("torchfast.fused_adam_", {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs});
  call_below_autograd<AdamSig>("torchfast::fused_adam_", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                               state_steps, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize,
                               decoupled_weight_decay, lr_tensor, grad_scale, found_inf, clip_coef);
  bump_versions({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps});
}

void fused_sgd_autograd(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                        double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                        bool is_first_step, OptTensor lr_tensor, OptTensor grad_scale, OptTensor found_inf,
                        OptTensor clip_coef) {
  check_not_grad_mode("torchfast.fused_sgd_", {params, grads, momentum_buffers});
  call_below_autograd<SgdSig>("torchfast::fused_sgd_", params, grads, momentum_buffers, lr, momentum, dampening,
                              weight_decay, nesterov, maximize, is_first_step, lr_tensor, grad_scale, found_inf,
                              clip_coef);
  bump_versions({params, grads, momentum_buffers});
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, Autograd, m) {
  m.impl("fused_adam_", &fused_adam_autograd);
  m.impl("fused_sgd_", &fused_sgd_autograd);
}

}  // namespace torchfast
