"""Python face of the clipping ops (csrc/clip): fake registrations and kernel-or-reference dispatch."""
from __future__ import annotations

import torch

from torchfast import _loader
from torchfast.ops._registry import compiled_op, register_fake_if_compiled
from torchfast.reference import clip as ref


@register_fake_if_compiled("total_norm")
def _total_norm_fake(tensors, norm_type, dtype=None):
    return tensors[0].new_empty((), dtype=dtype or ref.promoted_dtype(tensors))


@register_fake_if_compiled("clip_grads_with_norm_")
def _clip_grads_with_norm_fake(grads, total_norm, max_norm):
    return None


def _any_sparse(tensors) -> bool:
    return any(t.layout != torch.strided for t in tensors)  # sparse grads: the reference (torch's ops)


def total_norm(tensors: list[torch.Tensor], norm_type: float = 2.0, dtype=None) -> torch.Tensor:
    """Norm of all tensors (one device) viewed as one vector, in `dtype` (default: the tensors'
    promoted dtype); one multi-tensor pass for norm types 1, 2 and inf, the reference otherwise."""
    norm_type = float(norm_type)
    if (tensors and ref.is_kernel_norm_type(norm_type) and _loader.has_kernel("total_norm", tensors[0].device.type)
            and not _any_sparse(tensors)):
        return compiled_op("total_norm")(tensors, norm_type, dtype)
    return ref.total_norm(tensors, norm_type, dtype)


def clip_grads_with_norm_(grads: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """grads *= min(max_norm / (total_norm + 1e-6), 1), in place (grads and total_norm on one device)."""
    if not grads:
        return
    if _loader.has_kernel("clip_grads_with_norm_", grads[0].device.type) and not _any_sparse(grads):
        compiled_op("clip_grads_with_norm_")(grads, total_norm, float(max_norm))
    else:
        ref.clip_grads_with_norm_(grads, total_norm, float(max_norm))
