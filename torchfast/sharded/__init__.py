"""Sharded training (FSDP2's `fully_shard`, DTensor) with torchfast's fused optimizers, clipping and layers.

- torchfast.optim.SGD/Adam/AdamW step DTensor parameters on each rank's local shards, one fused call
  per param group; their state is DTensors placed like the parameters (torch.optim's layout), so
  `torch.distributed.checkpoint` saves and loads it and torch.optim's checkpoints load both ways.
- torchfast.nn.utils.clip_grad_norm_ / get_total_norm on DTensor grads: one fused pass per rank, one
  all-reduce per mesh (not per tensor); a Replicate() DTensor back, as torch returns.
- ShardedGradScaler: torch's, with the inf/NaN flags all-reduced on the path fused optimizers take.
- fully_shard: torch's, for models whose parameters torchfast keeps in another layout (FSDP2 wants
  them contiguous).
"""
from torchfast.sharded.dtensor import is_dtensor, local, total_norm

__all__ = ["ShardedGradScaler", "fully_shard", "is_dtensor", "local", "total_norm"]


def __getattr__(name):  # these import torch.distributed.fsdp: only when asked for
    if name == "ShardedGradScaler":
        from torchfast.sharded.grad_scaler import ShardedGradScaler
        return ShardedGradScaler
    if name == "fully_shard":
        from torchfast.sharded.fsdp import fully_shard
        return fully_shard
    raise AttributeError(f"module 'torchfast.sharded' has no attribute {name!r}")
