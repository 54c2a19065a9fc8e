"""Python face of the batch-norm ops (csrc/norm): fake and autograd registrations, and the public
function that runs the kernel or, where no kernel serves the device, the reference."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from torchfast import _loader
from torchfast.ops._registry import (autograd_transforms_active, compiled_op, exporting, grads_through,
                                      register_fake_if_compiled)
from torchfast.reference import norm as ref


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@register_fake_if_compiled("bn_add_relu")
def _bn_add_relu_fake(input, weight, bias, residual, running_mean, running_var, training, eps, relu):
    c = input.size(1)
    stats = [input.new_empty((c,), dtype=_stat_dtype(input)) for _ in range(3)]
    return (torch.empty_like(input), *stats)


@register_fake_if_compiled("bn_add_relu_backward")
def _bn_add_relu_backward_fake(grad_out, input, out, weight, save_mean, save_invstd, training, relu, has_residual):
    c = input.size(1)
    grad_res = torch.empty_like(input) if has_residual else input.new_empty((0,))
    return (torch.empty_like(input), save_mean.new_empty((c,)), save_mean.new_empty((c,)), grad_res)


def _setup_context(ctx, inputs, output):
    input, weight, bias, residual, running_mean, running_var, training, eps, relu = inputs
    out, mean, invstd, var = output
    # bias and var only serve a double backward (a parameter and C values); the residual is not kept:
    # out's ReLU mask is all the gradients need of it
    ctx.save_for_backward(input, out, weight, mean, invstd, bias, var)
    ctx.training, ctx.relu, ctx.has_residual, ctx.eps = training, relu, residual is not None, eps
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, invstd, var)


def _backward(ctx, grad_out, _gm, _gi, _gv):
    input, out, weight, mean, invstd, bias, var = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True (double backward): the kernel's backward is not differentiable, so the
        # gradient is taken through the reference's batch norm (eval mode normalises with the
        # statistics the forward used: the running ones, returned as mean/var), times out's ReLU
        # mask: relu(bn(x) + r) has the same first and second derivatives as mask * (bn(x) + r).
        bn_out = ref.bn_add_relu(input, weight, bias, None, None if ctx.training else mean,
                                 None if ctx.training else var, ctx.training, ctx.eps, False)[0]
        gy = torch.where(out > 0, grad_out, torch.zeros_like(grad_out)) if ctx.relu else grad_out
        return (*grads_through(bn_out, (input, weight, bias), ctx.needs_input_grad[:3], gy),
                gy if ctx.needs_input_grad[3] else None, None, None, None, None, None)
    gx, gw, gb, gres = torch.ops.torchfast.bn_add_relu_backward(
        grad_out, input, out, weight, mean, invstd, ctx.training,
        ctx.relu, ctx.has_residual)
    gw = None if ctx.weight_dtype is None else gw.to(ctx.weight_dtype)
    gb = None if ctx.bias_dtype is None else gb.to(ctx.bias_dtype)
    return gx, gw, gb, (gres if ctx.has_residual else None), None, None, None, None, None


if _loader.STATE.loaded:
    try:
        torch.library.register_autograd("torchfast::bn_add_relu", _backward, setup_context=_setup_context)
    except (RuntimeError, AttributeError):  # schema absent in a partial build
        pass


def bn_add_relu(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
                relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(relu?(batch_norm(input) + residual?), mean, invstd, biased var); see csrc/torchfast.cpp."""
    if not exporting() and not autograd_transforms_active() and _loader.has_kernel(
            "bn_add_relu", input.device.type) and _loader.has_kernel(
            "bn_add_relu_backward", input.device.type):
        return compiled_op("bn_add_relu")(input, weight, bias, residual, running_mean, running_var, training,
                                          float(eps), relu)
    return ref.bn_add_relu(input, weight, bias, residual, running_mean, running_var, training, float(eps), relu)
