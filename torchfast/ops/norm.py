"""Python face of the batch-norm ops (csrc/norm): fake registrations, and the public function that
runs the kernel or, where no kernel serves the device, the reference. Their autograd is a C++ kernel
at the Autograd key (csrc/norm/bn_relu_autograd.cpp), double backward included."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from torchfast import _loader
from torchfast.ops._registry import autograd_transforms_active, compiled_op, lower_to_reference, register_fake_if_compiled
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


def bn_add_relu(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
                relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(relu?(batch_norm(input) + residual?), mean, invstd, biased var); see csrc/torchfast.cpp."""
    if not lower_to_reference() and not autograd_transforms_active() and _loader.has_kernel(
            "bn_add_relu", input.device.type) and _loader.has_kernel(
            "bn_add_relu_backward", input.device.type):
        return compiled_op("bn_add_relu")(input, weight, bias, residual, running_mean, running_var, training,
                                          float(eps), relu)
    return ref.bn_add_relu(input, weight, bias, residual, running_mean, running_var, training, float(eps), relu)
