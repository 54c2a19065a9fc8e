"""Pure-PyTorch references of the batch-norm ops (same contracts as csrc/torchfast.cpp)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    return t.view([1, -1] + [1] * (x.dim() - 2))


def bn_add_relu(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, eps: float,
                relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, mean, invstd, biased var) as the kernel returns them; differentiable through autograd."""
    stat = _stat_dtype(input)
    x = input.to(stat)
    dims = [0] + list(range(2, input.dim()))
    if training:
        var, mean = torch.var_mean(x, dim=dims, unbiased=False)
    else:
        mean, var = running_mean.to(stat), running_var.to(stat)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.to(stat)
    y = (x - _channel_view(mean, x)) * _channel_view(scale, x)
    if bias is not None:
        y = y + _channel_view(bias.to(stat), x)
    if residual is not None:
        y = y + residual.to(stat)
    if relu:
        y = torch.relu(y)
    out = y.to(input.dtype, memory_format=torch.preserve_format)
    return out, mean.detach(), invstd.detach(), var.detach()


def bn_add_relu_backward(grad_out: Tensor, input: Tensor, out: Tensor, weight: Optional[Tensor], save_mean: Tensor,
                         save_invstd: Tensor, training: bool, relu: bool,
                         has_residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    stat = save_mean.dtype
    g = grad_out.to(stat)
    dy = torch.where(out > 0, g, torch.zeros_like(g)) if relu else g
    dims = [0] + list(range(2, input.dim()))
    xhat = (input.to(stat) - _channel_view(save_mean, input)) * _channel_view(save_invstd, input)
    grad_bias = dy.sum(dims)
    grad_weight = (dy * xhat).sum(dims)
    k = save_invstd if weight is None else save_invstd * weight.to(stat)
    if training:
        m = input.numel() // input.size(1)
        gx = (dy - _channel_view(grad_bias / m, input) - xhat * _channel_view(grad_weight / m, input))
        gx = gx * _channel_view(k, input)
    else:
        gx = dy * _channel_view(k, input)
    grad_res = dy.to(input.dtype) if has_residual else input.new_empty(0)
    return gx.to(input.dtype), grad_weight, grad_bias, grad_res
