"""FSDP2 for the Trainer: sharding the model, rebinding its optimizer, and checkpoints through
torch.distributed.checkpoint (DCP).

A sharded checkpoint is a directory: DCP's files for the model and optimizer state (each rank writes
its own shards) and `trainer.pt`, the rest of the Trainer's state (schedule, epoch, history,
callbacks, scaler, and every rank's RNG state) in torchfast's checkpoint format. It is written into
`<path>.partial` and swapped in by renames once every rank has finished, so a crash leaves the previous
checkpoint (at `<path>`, or at `<path>.old` if it came between the two renames; loading looks there).
"""
from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist
from torch import nn

from torchfast.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

TRAINER_STATE = "trainer.pt"  # the name checkpoint.load_checkpoint looks for in a directory


def checkpoint_dir(path: str) -> str:
    """Where a checkpoint asked for as `path` goes: `x.pt` becomes the directory `x.dcp`."""
    root, ext = os.path.splitext(path)
    return root + ".dcp" if ext == ".pt" else path


def shard(model: nn.Module, optimizer: torch.optim.Optimizer, units=None) -> None:
    """fully_shard `units` (default: default_units(model)) and then `model`, in place, and point
    `optimizer`'s param groups at the sharded parameters (fully_shard replaces each Parameter with a
    DTensor one), so an optimizer built on the unsharded model, as in DDP code, keeps working."""
    from torchfast.sharded.fsdp import default_units, fully_shard  # torch.distributed.fsdp: only when sharding

    if any(optimizer.state.values()):
        raise ValueError("Trainer(fsdp=True) shards the model and rebinds its optimizer, which must not have "
                         "taken a step yet (its state would belong to the unsharded parameters)")
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    group_names = []
    for group in optimizer.param_groups:
        missing = [tuple(p.shape) for p in group["params"] if id(p) not in names]
        if missing:
            raise ValueError(f"the optimizer holds parameters that are not the model's (shapes {missing[:3]}); "
                             "FSDP can only shard the model's own")
        group_names.append([names[id(p)] for p in group["params"]])
    for unit in default_units(model) if units is None else units:
        fully_shard(unit)
    fully_shard(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    for group, group_params in zip(optimizer.param_groups, group_names):
        group["params"] = [params[name] for name in group_params]


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP keeps them: FSDP2 shards
    parameters only, so each rank's statistics follow its own batches until synced."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def same_on_all_ranks(metrics: dict) -> dict:
    """Rank 0's metrics on every rank, so that callbacks (checkpointing, early stopping) decide alike:
    a sharded checkpoint is a collective, which every rank must enter."""
    box = [metrics]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save(model: nn.Module, optimizer, trainer_state: dict, path: str) -> str:
    """Writes the sharded checkpoint `path` (a directory) from every rank; returns it."""
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    partial, old = path + ".partial", path + ".old"
    rank = dist.get_rank()
    if rank == 0 and os.path.exists(partial):  # left by a crash
        shutil.rmtree(partial)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp_save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=partial)
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())
    if rank == 0:
        save_checkpoint({**trainer_state, "rngs": rngs}, os.path.join(partial, TRAINER_STATE))
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def existing(path: str) -> str:
    """`path`, or the previous checkpoint a crash between the swap's two renames left at `path`.old."""
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        return path + ".old"
    return path


def load(model: nn.Module, optimizer, path: str) -> dict:
    """Loads the sharded checkpoint `path` into `model` and `optimizer` (sharded alike, any world size
    DCP can reshard to) and sets this rank's RNG state; returns the rest of the Trainer's state."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = existing(path)
    trainer_state = load_checkpoint(path)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp_load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    rngs = trainer_state.pop("rngs")
    rank = dist.get_rank()
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return trainer_state
