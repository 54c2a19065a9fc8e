"""Trainer callbacks in the style of Lightning's: EarlyStopping and ModelCheckpoint.

A callback sees the Trainer at the end of each epoch (after validation) with that epoch's metrics,
and may stop training; its state goes into checkpoints, so a resumed run continues it.
"""
from __future__ import annotations

import math
import os


class Callback:
    # Callbacks that write checkpoints run after the others, so that what they save includes the
    # other callbacks' state for this epoch.
    runs_last = False

    def on_before_optimizer_step(self, trainer) -> None:
        """Called with the step's gradients in place (scaled, under an fp16 GradScaler)."""

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _improved(value: float, best: float, mode: str, min_delta: float) -> bool:
    if math.isnan(value):
        return False
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _check_mode(mode: str) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")


class EarlyStopping(Callback):
    """Stops training when `monitor` has not improved by more than min_delta for `patience` epochs."""

    def __init__(self, monitor: str = "val_loss", patience: int = 5, mode: str = "min", min_delta: float = 0.0):
        _check_mode(mode)
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, min_delta
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_epochs = 0

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        if self.monitor not in metrics:
            raise KeyError(f"EarlyStopping monitors {self.monitor!r}, but the epoch's metrics are {sorted(metrics)}")
        value = float(metrics[self.monitor])
        if _improved(value, self.best, self.mode, self.min_delta):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= self.patience:
                trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = float(state["best"]), int(state["bad_epochs"])


class ModelCheckpoint(Callback):
    """Writes `last.pt` every epoch and `best.pt` when `monitor` improves, each with the Trainer's full
    state (model, optimizer, scheduler, scaler, epoch, RNG states, callbacks, best score), atomically."""

    runs_last = True

    def __init__(self, dirpath: str, monitor: str = "val_loss", mode: str = "min", save_last: bool = True):
        _check_mode(mode)
        self.dirpath, self.monitor, self.mode, self.save_last = dirpath, monitor, mode, save_last
        self.best = math.inf if mode == "min" else -math.inf

    @property
    def last_path(self) -> str:
        return os.path.join(self.dirpath, "last.pt")

    @property
    def best_path(self) -> str:
        return os.path.join(self.dirpath, "best.pt")

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        if self.monitor in metrics and _improved(float(metrics[self.monitor]), self.best, self.mode, 0.0):
            self.best = float(metrics[self.monitor])
            trainer.save_checkpoint(self.best_path)
        if self.save_last:
            trainer.save_checkpoint(self.last_path)

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state["best"])


class TensorBoard(Callback):
    """Logs each epoch's metrics (losses, accuracy, lr, samples/s) as TensorBoard scalars; optionally
    weight histograms (every epoch) and gradient histograms (every `histogram_every` optimizer
    steps), and the model graph traced on `graph_input` (once). Needs the `tensorboard` package."""

    def __init__(self, log_dir: str, histograms: bool = False, graph_input=None, histogram_every: int = 100):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise RuntimeError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from e
        self.writer = SummaryWriter(log_dir)
        self.histograms = histograms
        self.graph_input = graph_input
        self.histogram_every = histogram_every

    def on_before_optimizer_step(self, trainer) -> None:
        if self.histograms and trainer.global_step % self.histogram_every == 0:
            for name, p in trainer.model.named_parameters():
                if p.grad is not None:
                    self.writer.add_histogram(f"grads/{name}", p.grad.detach().float().cpu(), trainer.global_step)

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        step = int(metrics["epoch"])
        if self.graph_input is not None:
            was_training = trainer.model.training
            trainer.model.eval()
            self.writer.add_graph(trainer.model, self.graph_input)
            trainer.model.train(was_training)
            self.graph_input = None
        for key, value in metrics.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        if self.histograms:
            for name, p in trainer.model.named_parameters():
                self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
