"""The training loop of the cheat sheet, done right once: AMP, gradient accumulation, clipping after
unscaling, per-batch or per-epoch LR schedules, validation under eval() and no_grad(), callbacks,
atomic checkpoints with the full state, exact resume, and a resumable checkpoint on Ctrl-C."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterable, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from torchfast.nn.utils import clip_grad_norm_
from torchfast.optim._base import FusedOptimizer
from torchfast.train.callbacks import Callback
from torchfast.train import distributed
from torchfast.train import fsdp as sharding
from torchfast.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

AMP_MODES = (None, "bf16", "fp16")


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of rows whose argmax is the target (classification)."""
    return float((outputs.argmax(dim=1) == targets).float().mean())


class Trainer:
    """fit(epochs) trains `model` with `optimizer` on `train_loader`, validating on `val_loader`.

    amp: None, "bf16" (autocast, CPU and GPU) or "fp16" (autocast + GradScaler, GPU).
    grad_accum_steps: optimizer steps every N batches (the loss is divided by N).
    max_grad_norm: clip the gradient norm; torchfast optimizers fold it into their fused step (set on
        their param groups), others get clip_grad_norm_ after the scaler has unscaled the grads.
    scheduler, scheduler_interval: stepped after every optimizer step ("batch", e.g. OneCycleLR) or
        after every epoch ("epoch").
    metric: f(outputs, targets) -> float for validation (default: accuracy); None for loss only.
    checkpoint_dir: where Ctrl-C writes `interrupted.pt`, a resumable checkpoint (a resumed run
        restarts the interrupted epoch from its first batch with the weights reached so far); not
        under fsdp, whose checkpoint is a collective that interrupted ranks cannot be relied on to enter.

    checkpoint_modules: submodules whose activations are recomputed in backward instead of stored
        (torch.utils.checkpoint, non-reentrant): less memory for more compute.

    Under torchrun (WORLD_SIZE > 1) it trains with DistributedDataParallel: see train/distributed.py.
    Each rank's batch is train_loader's batch size, so the global batch is world_size times it.

    fsdp=True (under torchrun) shards the model with FSDP2 instead of DDP: `fsdp_units` (default:
    torchfast.sharded.fsdp.default_units) and then the model are fully_shard-ed, the optimizer (built
    on the unsharded model, not yet stepped) is pointed at the sharded parameters, buffers are synced
    from rank 0 after each epoch (as DDP keeps them), fp16 uses torchfast.sharded.ShardedGradScaler,
    and checkpoints are torch.distributed.checkpoint directories (`x.pt` is written as `x.dcp`; see
    train/fsdp.py) that resume exactly.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                 train_loader: Iterable, val_loader: Optional[Iterable] = None, *, device=None,
                 amp: Optional[str] = None, grad_accum_steps: int = 1, max_grad_norm: Optional[float] = None,
                 scheduler=None, scheduler_interval: str = "epoch", metric: Optional[Callable] = accuracy,
                 callbacks: Iterable[Callback] = (), checkpoint_dir: Optional[str] = None, log: Callable = print,
                 progress: Optional[bool] = None, checkpoint_modules: Iterable[nn.Module] = (),
                 fsdp: bool = False, fsdp_units: Optional[Iterable[nn.Module]] = None):
        if amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        if scheduler_interval not in ("batch", "epoch"):
            raise ValueError(f"scheduler_interval must be 'batch' or 'epoch', got {scheduler_interval!r}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if amp == "fp16" and self.device.type != "cuda":
            raise ValueError("amp='fp16' needs a GPU (fp16 autocast with a GradScaler); use amp='bf16' on the CPU")
        for module in checkpoint_modules:
            _checkpoint_activations(module)
        self.dist = distributed.from_environment()
        if fsdp and not self.dist.enabled:
            raise ValueError("fsdp=True shards the model over the processes of torchrun (WORLD_SIZE >= 2), got "
                             f"WORLD_SIZE={self.dist.world_size}; run `torchfast train --fsdp --nproc N` or torchrun")
        self.fsdp = fsdp
        self.device = distributed.setup(self.dist, self.device)
        model.to(self.device)  # in place: the optimizer keeps the same Parameter objects
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.train_loader, self.val_loader = train_loader, val_loader
        self.train_model = model  # what the training forward runs: the model, or its DDP wrapper
        if fsdp:
            sharding.shard(model, optimizer, fsdp_units)
            self.train_loader = distributed.shard_loader(train_loader, self.dist)
        elif self.dist.enabled:
            self.train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.train_loader = distributed.shard_loader(train_loader, self.dist)
        self.amp, self.grad_accum_steps, self.max_grad_norm = amp, grad_accum_steps, max_grad_norm
        self.scheduler, self.scheduler_interval, self.metric = scheduler, scheduler_interval, metric
        self.callbacks = sorted(callbacks, key=lambda c: c.runs_last)
        self.checkpoint_dir = checkpoint_dir
        self.log = log if self.dist.is_main else (lambda *_: None)
        # a progress bar with loss and samples/s, by default only when stderr is a terminal
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.dist.is_main
        if fsdp:  # found_inf all-reduced: every rank skips the same steps and keeps one scale
            from torchfast.sharded import ShardedGradScaler
            self.scaler = ShardedGradScaler(self.device.type, enabled=amp == "fp16")
        else:
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.epoch = 0  # epochs completed
        self.global_step = 0  # optimizer steps taken
        self.history: list[dict] = []
        self.should_stop = False
        if max_grad_norm is not None and isinstance(optimizer, FusedOptimizer):
            for group in optimizer.param_groups:  # one norm pass, the clip inside the fused update
                group["max_grad_norm"] = float(max_grad_norm)

    # ---- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The full state (under fsdp without model and optimizer, which DCP writes as shards)."""
        weights = {} if self.fsdp else {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        return {
            **weights,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "global_step": self.global_step,
            "history": self.history, "rng": rng_state(),
            "callbacks": [c.state_dict() for c in self.callbacks],
            "callback_types": [type(c).__name__ for c in self.callbacks],
        }

    def load_state_dict(self, state: dict) -> None:
        if not self.fsdp:
            try:
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise RuntimeError(f"the checkpoint does not match this model/optimizer: {e}") from e
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.history = list(state.get("history", []))
        for cb, cb_state in _match_callbacks(self.callbacks, state):
            cb.load_state_dict(cb_state)
        if "rng" in state:
            set_rng_state(state["rng"])

    def save_checkpoint(self, path: str) -> str:
        """Writes the full state to `path` (rank 0 only under DDP: the ranks hold the same state; every
        rank under fsdp, into the directory sharding.checkpoint_dir(path)); returns where it went."""
        if self.fsdp:
            state = self.state_dict()
            del state["rng"]  # every rank's, inside
            return sharding.save(self.model, self.optimizer, state, sharding.checkpoint_dir(path))
        if self.dist.is_main:
            save_checkpoint(self.state_dict(), path)
        return path

    def resume(self, path: str) -> None:
        if self.fsdp:
            try:
                state = sharding.load(self.model, self.optimizer, path)
            except (RuntimeError, ValueError, KeyError) as e:
                raise RuntimeError(f"the checkpoint {path!r} does not match this model/optimizer: {e}") from e
            self.load_state_dict(state)
            return
        self.load_state_dict(load_checkpoint(path, map_location=self.device))

    # ---- loop ---------------------------------------------------------------------------------

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _to_device(self, batch):
        inputs, targets = batch
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    def _optimizer_step(self) -> None:
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self)
        if self.max_grad_norm is not None and not isinstance(self.optimizer, FusedOptimizer):
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.scheduler is not None and self.scheduler_interval == "batch":
            self.scheduler.step()

    def train_epoch(self) -> dict:
        self.model.train()
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)  # a different shuffle every epoch, the same on every rank
        total_loss, samples, start = 0.0, 0, time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        pending = 0
        bar = _progress_bar(self.train_loader, f"epoch {self.epoch + 1}") if self.progress else None
        for batch in (bar if bar is not None else self.train_loader):
            inputs, targets = self._to_device(batch)
            with self._autocast():
                loss = self.loss_fn(self.train_model(inputs), targets)
            self.scaler.scale(loss / self.grad_accum_steps).backward()
            pending += 1
            total_loss += float(loss.detach()) * len(targets)
            samples += len(targets)
            if pending == self.grad_accum_steps:
                self._optimizer_step()
                pending = 0
            if bar is not None:
                bar.set_postfix(loss=f"{total_loss / samples:.4f}",
                                samples_s=f"{samples / max(time.perf_counter() - start, 1e-9):.0f}")
        if pending:  # the epoch's last, shorter accumulation
            self._optimizer_step()
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        train_loss = distributed.mean_over_ranks(total_loss / max(samples, 1), self.dist, self.device)
        return {"train_loss": train_loss, "samples_per_s": samples * self.dist.world_size / max(seconds, 1e-9)}

    @torch.no_grad()
    def validate(self) -> dict:
        if self.val_loader is None:
            return {}
        self.model.eval()
        total_loss, total_metric, samples = 0.0, 0.0, 0
        for batch in self.val_loader:
            inputs, targets = self._to_device(batch)
            with self._autocast():
                outputs = self.model(inputs)
                loss = self.loss_fn(outputs, targets)
            total_loss += float(loss) * len(targets)
            if self.metric is not None:
                total_metric += self.metric(outputs.float(), targets) * len(targets)
            samples += len(targets)
        metrics = {"val_loss": total_loss / max(samples, 1)}
        if self.metric is not None:
            name = getattr(self.metric, "__name__", "metric")
            metrics["val_" + ("metric" if name.startswith("<") else name)] = total_metric / max(samples, 1)
        return metrics

    def fit(self, epochs: int, resume_from: Optional[str] = None) -> list[dict]:
        """Trains until `epochs` epochs are complete (counting those of a resumed checkpoint)."""
        if resume_from is not None:
            self.resume(resume_from)
        self.should_stop = False
        try:
            while self.epoch < epochs and not self.should_stop:
                train_metrics = self.train_epoch()
                if self.fsdp:
                    sharding.sync_buffers(self.model)
                metrics = {"epoch": self.epoch + 1, **train_metrics, **self.validate(),
                           "lr": self.optimizer.param_groups[0]["lr"]}
                metrics = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
                if self.fsdp:
                    metrics = sharding.same_on_all_ranks(metrics)
                if self.scheduler is not None and self.scheduler_interval == "epoch":
                    self.scheduler.step()
                self.epoch += 1
                self.history.append(metrics)
                for cb in self.callbacks:
                    cb.on_epoch_end(self, metrics)
                self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in metrics.items()))
        except KeyboardInterrupt:
            if self.checkpoint_dir is not None and self.dist.is_main and not self.fsdp:
                path = self.save_checkpoint(os.path.join(self.checkpoint_dir, "interrupted.pt"))
                self.log(f"interrupted: resumable checkpoint written to {path}")
            raise
        return self.history



def _match_callbacks(callbacks: list, state: dict) -> list:
    """(callback, its saved state) pairs, matched by type in order: the ranks of a distributed run do not
    all hold the same callbacks (only rank 0 writes TensorBoard logs), yet all load rank 0's checkpoint."""
    states = state.get("callbacks", [])
    types = state.get("callback_types")
    if types is None:  # a checkpoint from before the types were saved
        return list(zip(callbacks, states))
    pairs, used = [], set()
    for cb in callbacks:
        for i, name in enumerate(types):
            if i not in used and name == type(cb).__name__:
                used.add(i)
                pairs.append((cb, states[i]))
                break
    return pairs


def _progress_bar(iterable, description: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True)


def _checkpoint_activations(module: nn.Module) -> None:
    """Runs module's forward under torch.utils.checkpoint while training with grad enabled."""
    if getattr(module, "_torchfast_checkpointed", False):
        return
    forward = module.forward

    def checkpointed(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    module.forward = checkpointed
    module._torchfast_checkpointed = True
