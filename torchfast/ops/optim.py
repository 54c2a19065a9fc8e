"""Python face of the fused optimizer ops (csrc/optim): fake registrations for torch.compile and
public functions that run the compiled kernel, or the reference where no kernel serves the device."""
from __future__ import annotations

import torch

from torchfast import _loader
from torchfast.ops._registry import compiled_op, eager_entry, register_fake_if_compiled, use_eager_entry
from torchfast.reference import optim as ref


_FAST_ADAM = eager_entry("fused_adam_")
_FAST_SGD = eager_entry("fused_sgd_")


@register_fake_if_compiled("fused_adam_")
def _fused_adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2,
                     weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, lr_tensor=None,
                     grad_scale=None, found_inf=None, clip_coef=None):
    return None  # updates in place, returns nothing


@register_fake_if_compiled("fused_sgd_")
def _fused_sgd_fake(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
                    is_first_step, lr_tensor=None, grad_scale=None, found_inf=None, clip_coef=None):
    return None


def fused_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2,
                weight_decay, eps, amsgrad, maximize, decoupled_weight_decay=False, lr_tensor=None, grad_scale=None,
                found_inf=None, clip_coef=None) -> None:
    """Adam/AdamW step over lists of tensors, in place. See csrc/torchfast.cpp for the contract."""
    if not params:
        return
    if not _loader.has_kernel("fused_adam_", params[0].device.type):
        impl = ref.fused_adam_
    else:
        impl = compiled_op("fused_adam_")
        if _FAST_ADAM is not None and use_eager_entry():
            done = _FAST_ADAM(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
                              weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, lr_tensor, grad_scale,
                              found_inf, clip_coef)
            if done is not NotImplemented:
                return
    impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2,
         weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize,
         decoupled_weight_decay=decoupled_weight_decay, lr_tensor=lr_tensor, grad_scale=grad_scale,
         found_inf=found_inf, clip_coef=clip_coef)


def fused_sgd_(params, grads, momentum_buffers, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
               maximize=False, is_first_step=False, lr_tensor=None, grad_scale=None, found_inf=None,
               clip_coef=None) -> None:
    """SGD step over lists of tensors, in place. See csrc/torchfast.cpp for the contract."""
    if not params:
        return
    if not _loader.has_kernel("fused_sgd_", params[0].device.type):
        impl = ref.fused_sgd_
    else:
        impl = compiled_op("fused_sgd_")
        if _FAST_SGD is not None and use_eager_entry():
            done = _FAST_SGD(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
                             is_first_step, lr_tensor, grad_scale, found_inf, clip_coef)
            if done is not NotImplemented:
                return
    impl(params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
         nesterov=nesterov, maximize=maximize, is_first_step=is_first_step, lr_tensor=lr_tensor,
         grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef)
