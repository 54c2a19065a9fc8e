"""`torchfast export`: deploy what `torchfast train` produced (a run directory or one of its
checkpoints): rebuild the network from the checkpoint, optionally prune and quantize it, export it
to ONNX, verify it, and measure every variant against torch eager on the run's own validation data."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch

from torchfast.deploy import measure, runtime
from torchfast.deploy.onnx_export import export_onnx
from torchfast.deploy.pruning import prune
from torchfast.deploy.quantization import METHODS as QUANTIZE_METHODS
from torchfast.deploy.quantization import quantize
from torchfast.train import data
from torchfast.train.architectures import build_model, infer_shape
from torchfast.train.checkpoint import load_checkpoint
from torchfast.train.fsdp import TRAINER_STATE


class ExportError(RuntimeError):
    """What `torchfast export` reports in one line (missing or foreign checkpoint, bad option)."""


@dataclass
class TrainedRun:
    model: torch.nn.Module
    checkpoint: str
    data: str  # "digits", "synthetic" or the image folder's path
    image_size: int
    val_set: torch.utils.data.Dataset


def _checkpoint_path(path: str) -> tuple[str, Optional[str]]:
    """(checkpoint file or sharded checkpoint directory, run directory or None) for a run directory or
    a checkpoint."""
    if os.path.isdir(path) and not _is_sharded_checkpoint(path):
        for name in ("best.pt", "last.pt", "best.dcp", "last.dcp"):
            candidate = os.path.join(path, "checkpoints", name)
            if os.path.isfile(candidate) or _is_sharded_checkpoint(candidate):
                return candidate, path
        raise ExportError(f"{path}: no checkpoints/best.pt or checkpoints/last.pt (or best.dcp/last.dcp of an --fsdp "
                          "run): not a `torchfast train` run directory")
    if not os.path.exists(path):
        raise ExportError(f"{path}: no such run directory or checkpoint")
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return path, run_dir if os.path.isfile(os.path.join(run_dir, "summary.json")) else None


_NAMES = {"complexnet": "ComplexNetwork", "resnet18": "ResNet-18"}


def _is_sharded_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TRAINER_STATE))


def _sharded_weights(path: str) -> dict:
    """The whole state of a sharded (torch.distributed.checkpoint) checkpoint, read in this one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        whole = os.path.join(tmp, "whole.pt")
        dcp_to_torch_save(path, whole)
        return torch.load(whole, weights_only=True)


def load_run(path: str) -> TrainedRun:
    checkpoint, run_dir = _checkpoint_path(path)
    try:
        state = _sharded_weights(checkpoint) if _is_sharded_checkpoint(checkpoint) else load_checkpoint(checkpoint)
    except (RuntimeError, FileNotFoundError) as e:
        raise ExportError(str(e)) from None
    weights = state.get("model")
    summary = {}
    if run_dir is not None:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    arch = summary.get("architecture") or ("resnet18" if isinstance(weights, dict) and "fc.weight" in weights
                                           else "complexnet")
    try:
        in_channels, classes = infer_shape(arch, weights)
    except (KeyError, TypeError, AttributeError, ValueError):
        raise ExportError(f"{checkpoint}: holds no {_NAMES.get(arch, arch)} weights (not written by `torchfast train`)") from None
    kind = summary.get("data", "digits" if in_channels == 1 else "synthetic")
    size = 8 if kind == "digits" else int(summary.get("image_size", 32))
    model = build_model(arch, in_channels, classes, size, fused=True)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ExportError(f"{checkpoint}: the weights do not fit {_NAMES.get(arch, arch)} ({str(e).splitlines()[0]})") from None
    model.eval()
    if kind == "digits":
        _, val_set, _, _ = data.digits_datasets()
    elif kind == "synthetic":
        _, val_set, _, _ = data.synthetic_datasets(image_size=size, channels=in_channels, num_classes=classes)
    else:
        try:
            _, val_set, _, _ = data.image_folder_datasets(kind, image_size=size)
        except ValueError as e:
            raise ExportError(f"{checkpoint}: the run's images are not readable any more ({e})") from None
    return TrainedRun(model, checkpoint, kind, size, val_set)


def export_run(path: str, onnx_path: str, quantize_method: Optional[str] = None, prune_amount: Optional[float] = None,
               opset: Optional[int] = None, exporter: str = "dynamo", log=print) -> list:
    """What `torchfast export` does; returns the measured rows (see measure.compare)."""
    if quantize_method is not None and quantize_method not in QUANTIZE_METHODS:
        raise ExportError(f"--quantize must be one of {', '.join(QUANTIZE_METHODS)}, got {quantize_method!r}")
    for module in ("onnx", "onnxruntime") + (("onnxscript",) if exporter == "dynamo" else ()):
        try:
            __import__(module)
        except ImportError:
            raise ExportError(f"{module} is not installed: pip install 'torchfast[onnx]'") from None
    run = load_run(path)
    loader = torch.utils.data.DataLoader(run.val_set, batch_size=64)
    baseline = measure.Variant("torch eager fp32 (checkpoint)", run.model, measure.model_bytes(run.model))
    model = run.model
    if prune_amount is not None:
        import copy

        model = copy.deepcopy(run.model)
        log(str(prune(model, prune_amount)))
    example = next(iter(loader))[0][:2]
    try:
        report = export_onnx(model, example, onnx_path, opset=opset, exporter=exporter)
    except ValueError as e:
        raise ExportError(str(e)) from None
    log(f"verified: {report}")
    variants = [baseline]
    if prune_amount is not None:
        variants.append(measure.Variant(f"torch eager fp32, pruned {prune_amount:g}", model, measure.model_bytes(model)))
    variants.append(measure.Variant("onnxruntime fp32", runtime.OrtModule(onnx_path), report.file_bytes))
    if quantize_method is not None:
        target = os.path.splitext(onnx_path)[0] + f"-{quantize_method}.onnx" if quantize_method != "pt2e" else None
        q = quantize(model, example, method=quantize_method, calibration=loader, path=target)
        where = f" -> {q.path}" if q.path else ""
        log(f"quantized: {quantize_method} ({q.details.get('format', q.details.get('quantized', ''))}){where}")
        variants.append(measure.Variant(f"{quantize_method} int8", q.module, q.size_bytes))
    size = run.image_size
    channels = example.size(1)
    inputs = {b: (torch.randn(b, channels, size, size),) for b in (1, 32)}
    rows = measure.compare(variants, inputs, loader)
    log(measure.format_table(rows, f"{run.checkpoint} ({run.data}, {channels}x{size}x{size}); latency x = vs the "
                                   "checkpoint in torch eager"))
    return rows
