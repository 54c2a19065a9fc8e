"""What both ONNX exporters' translations share: opset bounds, the error they raise, lookups."""
from __future__ import annotations

import torch

DEFAULT_OPSET = 18  # what onnxruntime and most deployment stacks run; 23 adds the fused Attention node
MAX_OPSET = 23
LEGACY_MAX_OPSET = 20  # the TorchScript exporter's ceiling in this torch


class TranslationError(RuntimeError):
    """A torchfast op called in a way that has no ONNX translation (e.g. dropout in an exported graph)."""


def require_onnxscript():
    try:
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError("ONNX export with dynamo=True needs onnxscript: pip install 'torchfast[onnx]'") from e


def torchfast_op(name: str):
    """torch.ops.torchfast.<name>, or None where the compiled library (and so the op) is absent: the
    layers then run their references, which every exporter understands without a translation."""
    try:
        return getattr(torch.ops.torchfast, name)
    except (AttributeError, RuntimeError):
        return None
