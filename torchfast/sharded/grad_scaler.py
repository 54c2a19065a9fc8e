"""GradScaler for sharded training whose skip-or-step agrees on every rank, whichever way it is used."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as _TorchShardedGradScaler


class ShardedGradScaler(_TorchShardedGradScaler):
    """torch.distributed.fsdp's ShardedGradScaler, also right for optimizers that unscale inside their
    step (torchfast's fused optimizers, torch's `fused=True` ones).

    torch's sharded scaler all-reduces the inf/NaN flags in `unscale_()`. When `scaler.step(opt)` is
    called without it, an optimizer with `_step_supports_amp_scaling` gets the flags from
    `_check_inf_per_device`, which torch's sharded scaler does not reduce: a rank whose shard overflowed
    skips the step while the others take it, and the ranks' scales part ways (and with them the scaled
    gradients that FSDP's reduce-scatter sums). Here that path all-reduces the flags too, one collective
    per device, so both orders (`unscale_` then `step`, or `step` alone) skip together and keep one scale.
    """

    def _check_inf_per_device(self, optimizer):
        per_device = super()._check_inf_per_device(optimizer)
        works, copies_back = [], []
        for found_inf in per_device.values():
            if self._device != "cpu" and found_inf.device.type == "cpu":  # CPU-offloaded shards
                on_device = found_inf.to(self._device)
                copies_back.append((found_inf, on_device))
                found_inf = on_device
            works.append(dist.all_reduce(found_inf, async_op=True, group=self.process_group))
        for work in works:
            work.wait()
        for host, on_device in copies_back:
            host.copy_(on_device)
        return per_device
