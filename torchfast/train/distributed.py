"""Distributed data parallel set-up for the Trainer, from torchrun's environment.

torchrun (torch.distributed.run) sets RANK, WORLD_SIZE and LOCAL_RANK; with WORLD_SIZE > 1 the
Trainer initialises the process group (nccl on GPUs, gloo on the CPU), wraps the model in
DistributedDataParallel, shards the training data with a DistributedSampler (set_epoch every
epoch), and only rank 0 logs and writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> DistInfo:
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def setup(info: DistInfo, device: torch.device) -> torch.device:
    """Initialises the process group (once) and returns this rank's device."""
    if not info.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def cleanup() -> None:
    """Leaves the process group in step with the other ranks: a rank that tears its gloo connections
    down while a peer still talks to it (say, rank 0 saving a checkpoint) can make that peer abort."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:  # a peer is already gone: nothing left to wait for
            pass
        dist.destroy_process_group()


def shard_loader(loader: DataLoader, info: DistInfo, seed: int = 0) -> DataLoader:
    """The same loader over this rank's shard of the data (per-rank batch = the loader's batch)."""
    sampler = DistributedSampler(loader.dataset, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=isinstance(loader.sampler, RandomSampler), seed=seed,
                                 drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last)


def mean_over_ranks(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / info.world_size
