"""Functional forms of torchfast's fused layers."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from torchfast.ops import norm as norm_ops

__all__ = ["batch_norm_add_relu"]


def batch_norm_add_relu(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                        residual: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1,
                        eps: float = 1e-5, relu: bool = True) -> Tensor:
    """relu?(F.batch_norm(input, ...) + residual?) in one fused pass (two for the statistics).

    Same arguments and running-statistics semantics as torch.nn.functional.batch_norm (training
    updates running_mean/running_var in place with `momentum`, running_var unbiased), plus the
    optional residual added before the ReLU and the ReLU switch.
    """
    if input.dim() < 2:
        raise ValueError(f"batch_norm_add_relu: expected input of shape (N, C, *), got {tuple(input.shape)}")
    use_batch_stats = training or running_mean is None or running_var is None
    out, mean, _, var = norm_ops.bn_add_relu(
        input, weight, bias, residual, None if use_batch_stats else running_mean,
        None if use_batch_stats else running_var, use_batch_stats, eps, relu)
    if training and running_mean is not None and running_var is not None:
        n = input.numel() // input.size(1)
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = var * (n / max(n - 1, 1))
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return out
