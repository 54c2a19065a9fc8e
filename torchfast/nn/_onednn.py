"""Inference convolutions with fused epilogues through oneDNN (CPU).

torch links oneDNN and registers its fused convolution (`torch.ops.mkldnn._convolution_pointwise`,
what inductor's CPU backend lowers conv + ReLU and conv + add + ReLU to): the ReLU, and the residual
add, run as post-ops while the output tile is still in cache, instead of as extra passes over memory.
Used only on CPU fp32 tensors where torch has that op, and not while a model is being exported;
callers fall back to F.conv2d otherwise.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from torchfast.ops._registry import exporting


def _available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except (AttributeError, RuntimeError):
        return False


AVAILABLE = _available()


# Below this many input elements a post-op convolution costs more (its set-up per call: ~25-50 us
# measured) than the separate ReLU / add + ReLU pass it saves.
MIN_NUMEL = 16384


def usable(x: Tensor, weight: Tensor, padding) -> bool:
    # Not under torch.compile/export either: the op has no fake-tensor implementation to trace.
    # Tracing is checked first: a size test on a traced input would put a guard on its (dynamic) batch.
    return (AVAILABLE and not torch.compiler.is_compiling() and not exporting() and x.device.type == "cpu"
            and x.dim() == 4 and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not isinstance(padding, str) and x.numel() >= MIN_NUMEL)


def conv2d_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int, relu: bool) -> Tensor:
    """relu?(conv2d(x)) as one oneDNN call (check `usable` first)."""
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(padding), list(stride), list(dilation),
                                                   groups, "relu" if relu else "none", [], "")


def conv2d_add_relu(x: Tensor, residual: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """relu(conv2d(x) + residual) as one oneDNN call (check `usable` first)."""
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, weight, bias, list(padding), list(stride), list(dilation), groups, "add", 1.0, "relu", [], "")
