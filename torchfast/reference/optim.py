"""Pure-PyTorch references of the fused optimizer ops.

Same signatures and semantics as torch.ops.torchfast.fused_adam_ / fused_sgd_ (see
csrc/torchfast.cpp): the tests hold the kernels to these, and torchfast falls back to them when a
kernel is not available for a device. Math runs in float32 for fp16/bf16 params (float64 for
float64 params) and is rounded once when stored, as the kernels do.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_REDUCED = (torch.float16, torch.bfloat16)


def _acc(t: Tensor) -> Tensor:
    return t.float() if t.dtype in _REDUCED else t


def _check_same_device(op: str, params: list[Tensor]) -> None:
    if params:
        device = params[0].device
        for i, p in enumerate(params):
            if p.device != device:
                raise RuntimeError(f"{op}: all tensors of one call must be on one device; params[0] is on "
                                   f"{device} but params[{i}] is on {p.device}")


def _prologue(op: str, params, lr, lr_tensor, grad_scale, found_inf) -> tuple[bool, float, Optional[float]]:
    """(skip this step, the lr, the grad scale or None), after checking the devices."""
    _check_same_device(op, params)
    skip = found_inf is not None and float(found_inf) != 0.0
    scale = float(grad_scale) if grad_scale is not None else None
    return skip, float(lr_tensor) if lr_tensor is not None else lr, scale


def _unscaled_grad(g: Tensor, scale: Optional[float], clip: Optional[float]) -> Tensor:
    """The fp32 (or fp64) gradient the update uses: unscaled (and the unscaled value written back,
    as torch's fused optimizers do), then multiplied by the clip coefficient (not written back)."""
    ga = _acc(g)
    if scale is not None:
        ga = ga / scale
        g.copy_(ga)
    if clip is not None:
        ga = ga * clip
    return ga


@torch.no_grad()
def fused_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2,
                weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, lr_tensor=None, grad_scale=None,
                found_inf=None, clip_coef=None) -> None:
    skip, lr, scale = _prologue("torchfast.fused_adam_", params, lr, lr_tensor, grad_scale, found_inf)
    if skip:
        return
    clip = float(clip_coef) if clip_coef is not None else None
    for i, param in enumerate(params):
        state_steps[i] += 1
        step = float(state_steps[i])
        p, m, v = _acc(param), _acc(exp_avgs[i]), _acc(exp_avg_sqs[i])
        g = _unscaled_grad(grads[i], scale, clip)
        if maximize:
            g = -g
        if weight_decay != 0:
            if decoupled_weight_decay:
                p = p * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * p
        m = torch.lerp(m, g, 1 - beta1)
        v = v * beta2 + (1 - beta2) * g * g
        second = v
        if amsgrad:
            vmax = torch.maximum(_acc(max_exp_avg_sqs[i]), v)
            max_exp_avg_sqs[i].copy_(vmax)
            second = vmax
        step_size = lr / (1 - beta1 ** step)
        denom = second.sqrt() / math.sqrt(1 - beta2 ** step) + eps
        p = p - step_size * m / denom
        param.copy_(p)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)


@torch.no_grad()
def fused_sgd_(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
               is_first_step, lr_tensor=None, grad_scale=None, found_inf=None, clip_coef=None) -> None:
    skip, lr, scale = _prologue("torchfast.fused_sgd_", params, lr, lr_tensor, grad_scale, found_inf)
    if skip:
        return
    clip = float(clip_coef) if clip_coef is not None else None
    for i, param in enumerate(params):
        p = _acc(param)
        g = _unscaled_grad(grads[i], scale, clip)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g + weight_decay * p
        if momentum != 0:
            buf = g if is_first_step else _acc(momentum_buffers[i]) * momentum + (1 - dampening) * g
            momentum_buffers[i].copy_(buf)
            g = g + momentum * buf if nesterov else buf
        param.copy_(p - lr * g)
