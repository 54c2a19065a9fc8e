"""Gradient clipping with torch.nn.utils' signatures and semantics, on torchfast's fused kernels.

clip_grad_norm_ makes one multi-tensor pass to compute the norm and, only when it clips, one pass
to scale; the coefficient min(max_norm / (norm + 1e-6), 1) stays on the grads' device (no host
sync on CUDA).

DTensor grads (FSDP2's fully_shard): one fused pass over each rank's local shards and one all-reduce
per mesh for the norm, which comes back as a Replicate() DTensor, as torch's does; the scale runs on
the local shards. Plain tensors beside DTensors are taken as replicated (as FSDP2 and DDP keep them).

Non-finite gradients, the policy:
- clip_grad_norm_ returns the (inf/NaN) norm; with error_if_nonfinite=True it raises, as torch
  does (which reads the norm on the host). Otherwise the grads are scaled as torch scales them
  (an infinite norm zeroes finite grads; NaN stays NaN) and it is the caller's call what to do.
- Under torch.amp.GradScaler, call scaler.unscale_(optimizer) first: the scaler records the
  inf/NaN, and scaler.step() then skips the step (torchfast optimizers skip inside the kernel).
"""
from __future__ import annotations

import types
import warnings
from collections import defaultdict
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from torchfast.ops import clip as ops
from torchfast.sharded import dtensor as sharded

_TensorOrTensors = Union[Tensor, Iterable[Tensor]]

__all__ = ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm"]


def _by_device(tensors: list[Tensor]) -> dict[torch.device, list[Tensor]]:
    groups: dict[torch.device, list[Tensor]] = defaultdict(list)
    for t in tensors:
        groups[t.device].append(t)
    return groups


@torch.no_grad()
def get_total_norm(tensors: _TensorOrTensors, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                   foreach: Optional[bool] = None) -> Tensor:
    """Norm of `tensors` viewed as one vector, as torch.nn.utils.get_total_norm (`foreach` is accepted
    and ignored: the kernel is always multi-tensor)."""
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    norm_type = float(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    has_dtensors = any(sharded.is_dtensor(t) for t in tensors)
    if has_dtensors:
        total = sharded.total_norm(tensors, norm_type, None, _total_norm_by_device)
    else:
        total = _total_norm_by_device(tensors, norm_type)
    if error_if_nonfinite:
        _raise_if_nonfinite(total, norm_type)
    return sharded.replicated_like(total, tensors) if has_dtensors else total


def _total_norm_by_device(tensors: list[Tensor], norm_type: float, dtype=None) -> Tensor:
    """One kernel pass per device; the per-device norms combined on the first tensor's device."""
    if not tensors:
        return torch.tensor(0.0)
    first_device = tensors[0].device
    groups = _by_device(tensors)
    if len(groups) == 1:
        return ops.total_norm(tensors, norm_type, dtype)
    norms = [ops.total_norm(group, norm_type, dtype).to(first_device) for group in groups.values()]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def _raise_if_nonfinite(total: Tensor, norm_type: float) -> None:
    if torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`")


@torch.no_grad()
def clip_grads_with_norm_(parameters: _TensorOrTensors, max_norm: float, total_norm: Tensor,
                          foreach: Optional[bool] = None) -> None:
    """Scale the grads of `parameters` by min(max_norm / (total_norm + 1e-6), 1), as
    torch.nn.utils.clip_grads_with_norm_."""
    parameters = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = [sharded.local(p.grad) for p in parameters if p.grad is not None]
    if not grads:
        return
    total_norm = sharded.plain_value(total_norm)
    for device, group in _by_device(grads).items():
        ops.clip_grads_with_norm_(group, total_norm.to(device, non_blocking=True), float(max_norm))


@torch.no_grad()
def clip_grad_norm_(parameters: _TensorOrTensors, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: Optional[bool] = None) -> Tensor:
    """Drop-in for torch.nn.utils.clip_grad_norm_: clips the grads in place, returns the total norm."""
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    grads = [p.grad for p in parameters if p.grad is not None]
    total = get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
    clip_grads_with_norm_(parameters, max_norm, total, foreach)
    return total


def clip_grad_value_(parameters: _TensorOrTensors, clip_value: float, foreach: Optional[bool] = None) -> None:
    """torch.nn.utils.clip_grad_value_ itself: a clamp is one foreach pass already, nothing to fuse."""
    torch.nn.utils.clip_grad_value_(parameters, clip_value, foreach=foreach)
