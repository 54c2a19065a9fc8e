"""The main job, `torchfast train`: ComplexNetwork (torchfast's fused layers) on scikit-learn's
digits, with AdamW, OneCycleLR per batch, clipping, checkpoints, TensorBoard and a summary; or
torchvision's ResNet-18 (converted by torchfast.convert), and synthetic data or the user's own images."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

import torchfast
from torchfast.train.architectures import build_model
from torchfast.train import data, distributed
from torchfast.train.callbacks import ModelCheckpoint, TensorBoard
from torchfast.train.trainer import Trainer


@dataclass
class JobConfig:
    out: str
    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-2
    max_grad_norm: Optional[float] = 1.0
    amp: Optional[str] = None
    eager: bool = False  # the same network from plain torch modules and torch.optim, to compare speed
    synthetic: Optional[int] = None  # image size of random data instead of digits (= data "synthetic")
    model: str = "complexnet"  # or "resnet18" (architectures.ARCHITECTURES)
    data: str = "digits"  # "digits", "synthetic" or the path of an image folder (one subfolder per class)
    image_size: Optional[int] = None  # synthetic: 32; image folder: 64 (digits are 8x8)
    fsdp: bool = False  # shard with FSDP2 instead of DDP (under torchrun: --nproc N)
    resume: Optional[str] = None
    seed: int = 0
    device: str = "cpu"
    progress: Optional[bool] = None


def data_kind(config: JobConfig) -> str:
    return "synthetic" if config.synthetic else config.data


def _data_label(config: JobConfig) -> str:
    kind = data_kind(config)
    return kind if kind in ("digits", "synthetic") else os.path.abspath(kind)  # `torchfast export` reads it back


def image_size(config: JobConfig) -> int:
    kind = data_kind(config)
    if kind == "digits":
        return 8
    return config.synthetic or config.image_size or (32 if kind == "synthetic" else 64)


def datasets(config: JobConfig):
    """(train, val, in_channels, num_classes) for the config's data."""
    kind = data_kind(config)
    if kind == "digits":
        return data.digits_datasets(seed=config.seed)
    if kind == "synthetic":
        return data.synthetic_datasets(image_size=image_size(config), seed=config.seed)
    return data.image_folder_datasets(kind, image_size=image_size(config), seed=config.seed)


def build(config: JobConfig, in_channels: int, num_classes: int):
    torch.manual_seed(config.seed)
    model = build_model(config.model, in_channels, num_classes, image_size(config), fused=not config.eager)
    optimizer_cls = torch.optim.AdamW if config.eager else torchfast.optim.AdamW
    model = model.to(config.device)
    optimizer = optimizer_cls(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return model, optimizer


def run(config: JobConfig, log=print) -> dict:
    train_set, val_set, in_ch, classes = datasets(config)
    model, optimizer = build(config, in_ch, classes)
    train_loader, val_loader = data.loaders(train_set, val_set, config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, epochs=config.epochs,
                                                    steps_per_epoch=len(train_loader))
    info = distributed.from_environment()
    if info.enabled:  # under DDP each rank sees 1/world_size of the batches: the schedule follows
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, epochs=config.epochs,
            steps_per_epoch=-(-len(train_loader) // info.world_size))
    if config.resume is not None:
        _check_same_schedule(config, scheduler)
    os.makedirs(config.out, exist_ok=True)
    checkpoints = os.path.join(config.out, "checkpoints")
    tensorboard = TensorBoard(os.path.join(config.out, "tensorboard")) if info.is_main else None
    callbacks = [ModelCheckpoint(checkpoints, monitor="val_accuracy", mode="max")] + ([tensorboard] if tensorboard else [])
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), train_loader, val_loader, device=config.device,
                      amp=config.amp, max_grad_norm=config.max_grad_norm, scheduler=scheduler,
                      scheduler_interval="batch", callbacks=callbacks, checkpoint_dir=checkpoints, log=log,
                      progress=config.progress, fsdp=config.fsdp)
    start = time.perf_counter()
    try:
        history = trainer.fit(config.epochs, resume_from=config.resume)
    finally:
        if tensorboard is not None:
            tensorboard.close()
        if info.enabled:
            distributed.cleanup()
    seconds = time.perf_counter() - start
    last = history[-1] if history else {}
    summary = {
        "val_accuracy": last.get("val_accuracy"), "val_loss": last.get("val_loss"), "epochs": trainer.epoch,
        "seconds": round(seconds, 3),
        "samples_per_s": round(sum(h["samples_per_s"] for h in history) / max(len(history), 1), 1),
        "model": "plain torch" if config.eager else "torchfast", "architecture": config.model,
        "data": _data_label(config), "image_size": image_size(config), "classes": classes,
        "amp": config.amp, "device": config.device, "processes": info.world_size,
        "sharding": "fsdp" if config.fsdp else ("ddp" if info.enabled else None),
        "out": os.path.abspath(config.out),
    }
    if info.is_main:
        with open(os.path.join(config.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _check_same_schedule(config: JobConfig, scheduler) -> None:
    """--resume continues a run on its own OneCycleLR schedule: the epochs (and batch size) must match."""
    from torchfast.train.checkpoint import load_checkpoint

    saved = (load_checkpoint(config.resume).get("scheduler") or {}).get("total_steps")
    if saved is not None and saved != scheduler.total_steps:
        raise ValueError(f"--resume {config.resume}: that run's learning-rate schedule has {saved} steps, this one "
                         f"{scheduler.total_steps}; resume with the run's own --epochs and --batch-size")
