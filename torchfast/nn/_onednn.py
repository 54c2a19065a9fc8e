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
from torchfast.reference.pool import is_channels_last
from torchfast.sharded.dtensor import version_counters_track_contents


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
    # Nor under torch.jit.trace, which would record the op with an opaque pre-packed weight.
    return (AVAILABLE and not torch.compiler.is_compiling() and not exporting() and not torch.jit.is_tracing()
            and x.device.type == "cpu"
            and x.dim() == 4 and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not isinstance(padding, str) and x.numel() >= MIN_NUMEL)


CAN_PACK = AVAILABLE and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")


class PackedWeight:
    """An inference convolution's weight in the blocked layout oneDNN's kernel wants for one input
    geometry, made once instead of inside every call (what inductor's CPU freezing does). Handed a
    plain weight, oneDNN reorders it on each call: for small images with many channels that costs more
    than the convolution itself (measured: ResNet-18's 512-channel 3x3 convolution at batch 16, 2x2,
    channels_last: 14.5 ms per call, 2.3 ms with the packed weight). One entry, rebuilt when the weight
    (the same tensor object, held here, at the same version) or the input geometry changes (writes
    through `.data` bypass the version counter, as for FoldedConvBN); a weight that wants a gradient,
    or an inference tensor (no version counter), is used as it is. The packed tensor is opaque to
    torch (no storage): copies and pickles of a module start with an empty cache.

    Only for channels_last inputs: beside a pre-packed weight oneDNN answers in channels_last whatever
    the input's layout, and an NCHW caller (one that .view()s the result) must get NCHW back. Not under
    FSDP2 either, whose all-gather rewrites the parameters with their version counters kept."""

    def __init__(self):
        self.entry = None  # (weight, key, packed weight), replaced whole: threads may share the module

    def __reduce__(self):
        return (PackedWeight, ())

    def get(self, weight: Tensor, x: Tensor, padding: Sequence[int], stride: Sequence[int],
            dilation: Sequence[int], groups: int):
        if not CAN_PACK or (torch.is_grad_enabled() and weight.requires_grad) or weight.is_inference() or \
                not is_channels_last(x) or not version_counters_track_contents():
            return weight
        key = (weight._version, weight.data_ptr(), tuple(x.shape), x.stride(), tuple(padding), tuple(stride),
               tuple(dilation), groups)
        entry = self.entry  # (one read: another thread may replace it meanwhile)
        if entry is not None and entry[0] is weight and entry[1] == key:
            return entry[2]
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            weight, list(padding), list(stride), list(dilation), groups, list(x.shape))
        self.entry = (weight, key, packed)
        return packed


def conv2d_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int, relu: bool, packed: Optional[PackedWeight] = None) -> Tensor:
    """relu?(conv2d(x)) as one oneDNN call (check `usable` first). `packed`: the weight is a constant
    (inference) and is handed to oneDNN pre-packed (see PackedWeight)."""
    w = weight if packed is None else packed.get(weight, x, padding, stride, dilation, groups)
    return torch.ops.mkldnn._convolution_pointwise(x, w, bias, list(padding), list(stride), list(dilation),
                                                   groups, "relu" if relu else "none", [], "")


def conv2d_add_relu(x: Tensor, residual: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int], groups: int,
                    packed: Optional[PackedWeight] = None) -> Tensor:
    """relu(conv2d(x) + residual) as one oneDNN call (check `usable` first); `packed` as for conv2d_relu."""
    w = weight if packed is None else packed.get(weight, x, padding, stride, dilation, groups)
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, w, bias, list(padding), list(stride), list(dilation), groups, "add", 1.0, "relu", [], "")
