"""Pure-PyTorch references of the clipping ops (same contracts as csrc/torchfast.cpp)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

_REDUCED = (torch.float16, torch.bfloat16)


def promoted_dtype(tensors: list[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@torch.no_grad()
def total_norm(tensors: list[Tensor], norm_type: float, dtype=None) -> Tensor:
    """Norm of all tensors viewed as one vector (any norm_type torch.linalg.vector_norm takes),
    accumulated in fp32 (fp64 for fp64), returned in `dtype` (default: the tensors' promoted dtype)."""
    if not tensors:
        raise RuntimeError("torchfast.total_norm: needs at least one tensor")
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != device:
            raise RuntimeError(f"torchfast.total_norm: all tensors of one call must be on one device; tensors[0] "
                               f"is on {device} but tensors[{i}] is on {t.device}")
    out_dtype = dtype or promoted_dtype(tensors)
    acc = torch.float64 if promoted_dtype(tensors) == torch.float64 else torch.float32
    # empty tensors add nothing (the inf-norm of nothing is 0, not an error)
    norms = [_norm(t, norm_type, acc) for t in tensors if t.numel() > 0]
    if not norms:
        return torch.zeros((), dtype=out_dtype, device=device)
    return torch.linalg.vector_norm(torch.stack(norms), norm_type).to(out_dtype)


def _norm(t: Tensor, norm_type: float, acc: torch.dtype) -> Tensor:
    if t.layout != torch.strided:  # sparse norms take no dtype argument
        return torch.linalg.vector_norm(t.to(acc), norm_type)
    return torch.linalg.vector_norm(t, norm_type, dtype=acc)


def clip_coefficient(total_norm: Tensor, max_norm: float) -> Tensor:
    """min(max_norm / (total_norm + 1e-6), 1) in fp32 (fp64 for an fp64 norm), NaN-propagating."""
    norm = total_norm if total_norm.dtype == torch.float64 else total_norm.float()
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


@torch.no_grad()
def clip_grads_with_norm_(grads: list[Tensor], total_norm: Tensor, max_norm: float) -> None:
    if not grads:
        return
    coef = clip_coefficient(total_norm, max_norm)
    for g in grads:
        if g.dtype in _REDUCED:
            g.copy_(g.float() * coef)
        else:
            g.mul_(coef.to(g.dtype))


def is_kernel_norm_type(norm_type: float) -> bool:
    return norm_type in (1.0, 2.0) or (math.isinf(norm_type) and norm_type > 0)
