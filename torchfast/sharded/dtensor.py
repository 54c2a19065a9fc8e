"""DTensor parameters and gradients (FSDP2's `fully_shard`, tensor parallelism) for the fused kernels.

The kernels work on plain tensors. A DTensor's local shard is one, and every op torchfast runs on
parameters is elementwise (optimizer updates, clipping's scale) or a reduction whose per-rank parts
combine exactly (the gradient norm), so the fused step runs on each rank's local shards in one call
and, where a result spans the mesh, one collective finishes it.

Placements: `Shard(d)` on a mesh dimension means that dimension's ranks hold disjoint pieces (their
norms combine by sum of p-th powers, or max for inf); `Replicate()` means they hold the same values
(nothing to combine). `Partial()` parameters or gradients (pending sums) are refused: their local
values are not the values, so no elementwise update or local norm of them is correct.
"""
from __future__ import annotations

import math
import sys
from collections import defaultdict
from typing import Callable, Optional

import torch
from torch import Tensor

_DTENSOR = None  # torch.distributed.tensor.DTensor once something has imported it


def is_dtensor(t) -> bool:
    """Whether `t` is a DTensor, without importing torch.distributed.tensor (~0.5 s at start-up): until
    something has imported it, no DTensor can exist."""
    global _DTENSOR
    if _DTENSOR is None:
        module = sys.modules.get("torch.distributed.tensor")
        if module is None:
            return False
        _DTENSOR = module.DTensor
    return isinstance(t, _DTENSOR)


def version_counters_track_contents() -> bool:
    """Whether a tensor's version counter still changes whenever its contents do. Not under FSDP2
    (fully_shard, or another composable API): its all-gather writes the new values of a step into the
    same unsharded parameters with their version counters preserved, so caches keyed on versions
    (torchfast's folded conv-BN weights, channels_last weight copies) would serve the old values."""
    module = sys.modules.get("torch.distributed._composable_state")
    return module is None or not len(module._module_state_mapping)


def local(t: Tensor) -> Tensor:
    """The tensor a kernel updates in place: a DTensor's local shard (its own storage, so in-place
    updates reach the DTensor), a plain tensor itself. `_local_tensor` rather than `to_local()`: the
    callers run under no_grad and `to_local()` goes through an autograd Function on every call."""
    if is_dtensor(t):
        return t._local_tensor
    return t


def check_placements(t: Tensor, what: str) -> None:
    if any(p.is_partial() for p in t.placements):
        raise ValueError(f"{what}: a DTensor with placements {tuple(t.placements)} holds pending partial sums, "
                         "not values; redistribute it to Shard or Replicate placements first "
                         "(dtensor.redistribute(mesh, [Replicate()]))")


def _sharded_mesh_dims(t: Tensor) -> tuple[int, ...]:
    return tuple(i for i, p in enumerate(t.placements) if p.is_shard())


def total_norm(tensors: list[Tensor], norm_type: float, dtype: Optional[torch.dtype],
               local_norm: Callable[[list[Tensor], float, Optional[torch.dtype]], Tensor]) -> Tensor:
    """Norm of `tensors` (plain tensors and DTensors, one device) viewed as one vector, as a plain tensor
    that every rank holds the same value of.

    DTensors are grouped by (mesh, sharded mesh dims); each group takes one `local_norm` pass over its
    local shards and one all-reduce per sharded mesh dimension (one collective in all under FSDP2's 1-D
    mesh), of the p-th power sum (max for inf, min for -inf). Plain tensors are taken as they are on this rank
    (replicated, as DDP and FSDP2 keep them)."""
    if norm_type == 0:
        raise ValueError("norm_type=0 on DTensor gradients is not supported: torch's counts the tensors whose "
                         "count of non-zeros is non-zero, which takes a collective per tensor; use 1, 2, inf or "
                         "another p")
    plain: list[Tensor] = []
    groups: dict[tuple, list[Tensor]] = defaultdict(list)
    for t in tensors:
        if is_dtensor(t):
            check_placements(t, "gradient norm")
            groups[(t.device_mesh, _sharded_mesh_dims(t))].append(t._local_tensor)
        else:
            plain.append(t)
    norms = [local_norm(plain, norm_type, dtype)] if plain else []
    for (mesh, sharded_dims), all_shards in groups.items():
        # a min: shards empty on this rank take no part (its identity, inf, stands for none at all)
        shards = [t for t in all_shards if t.numel()] if norm_type == -math.inf else all_shards
        norm = local_norm(shards, norm_type, dtype) if shards else \
            torch.full((), math.inf, dtype=dtype or all_shards[0].dtype, device=all_shards[0].device)
        if sharded_dims:
            import torch.distributed as dist
            norm = _reduce_over(norm, norm_type, [mesh.get_group(d) for d in sharded_dims], dist)
        norms.append(norm)
    if len(norms) == 1:
        return norms[0]
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


def _reduce_over(norm: Tensor, norm_type: float, process_groups, dist) -> Tensor:
    """The norm over all ranks of `process_groups` from each rank's local norm."""
    if math.isinf(norm_type):  # inf: the largest |x| of all ranks; -inf: the smallest
        value = norm.clone()
        op = dist.ReduceOp.MAX if norm_type > 0 else dist.ReduceOp.MIN
        for group in process_groups:
            dist.all_reduce(value, op=op, group=group)
        return value
    # p-th powers in fp64 at least as wide as the norm: a sum of squares of fp32 norms keeps its digits
    value = norm.double() ** norm_type if norm.dtype != torch.float64 else norm ** norm_type
    for group in process_groups:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return (value ** (1.0 / norm_type)).to(norm.dtype)


def replicated_like(value: Tensor, tensors: list[Tensor]) -> Tensor:
    """`value` as a Replicate() DTensor on the mesh of the first DTensor in `tensors` (what torch's
    clip_grad_norm_ returns for DTensor grads), or `value` itself when there is none."""
    for t in tensors:
        if is_dtensor(t):
            from torch.distributed.tensor import DTensor, Replicate
            mesh = t.device_mesh
            return DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return value


def plain_value(t: Tensor) -> Tensor:
    """A norm or coefficient as a plain tensor: a DTensor's full value."""
    return t.full_tensor() if is_dtensor(t) else t
