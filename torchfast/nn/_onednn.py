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

from torchfast.nn import _dense_conv, _measured
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
        self.planar_entry = None  # (weight, key, the weight NCHW-contiguous) for the planar path, see below
        self.dense_entry = None  # (weight, key, the convolution's matrix) for the dense path (_dense_conv)

    def __reduce__(self):
        return (PackedWeight, ())

    @staticmethod
    def applies(weight: Tensor, x: Tensor) -> bool:
        return (CAN_PACK and not (torch.is_grad_enabled() and weight.requires_grad) and not weight.is_inference()
                and is_channels_last(x) and version_counters_track_contents())

    def get(self, weight: Tensor, x: Tensor, padding: Sequence[int], stride: Sequence[int],
            dilation: Sequence[int], groups: int):
        return self._packed(weight, x, padding, stride, dilation, groups) if self.applies(weight, x) else weight

    def _packed(self, weight: Tensor, x: Tensor, padding, stride, dilation, groups) -> Tensor:
        key = (weight._version, weight.data_ptr(), tuple(x.shape), x.stride(), tuple(padding), tuple(stride),
               tuple(dilation), groups)
        entry = self.entry  # (one read: another thread may replace it meanwhile)
        if entry is not None and entry[0] is weight and entry[1] == key:
            return entry[2]
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            weight, list(padding), list(stride), list(dilation), groups, list(x.shape))
        self.entry = (weight, key, packed)
        return packed

    def planar(self, weight: Tensor) -> Tensor:
        """The weight as the planar path wants it: OIHW-contiguous (a channels_last weight beside an NCHW
        input sends oneDNN down a path 1.4-2.4x slower, measured at 2x2-4x4 images), copied once."""
        if weight.is_contiguous():
            return weight
        key = (weight._version, weight.data_ptr())
        entry = self.planar_entry
        if entry is not None and entry[0] is weight and entry[1] == key:
            return entry[2]
        planar = weight.contiguous()
        self.planar_entry = (weight, key, planar)
        return planar

    def dense(self, weight: Tensor, x: Tensor, conv_args: tuple) -> Tensor:
        """The convolution's dense matrix for a channels_last input of x's geometry, built once."""
        stride, padding, dilation, _ = conv_args
        key = (weight._version, weight.data_ptr(), tuple(x.shape[2:]), tuple(stride), tuple(padding),
               tuple(dilation))
        entry = self.dense_entry
        if entry is not None and entry[0] is weight and entry[1] == key:
            return entry[2]
        matrix = _dense_conv.dense_matrix(weight, x.shape[2:], stride, padding, dilation, channels_last=True)
        self.dense_entry = (weight, key, matrix)
        return matrix

    def keep_only(self, path: str) -> None:
        """Drop the weights of the paths other than `path` ("packed" | "planar" | "dense")."""
        if path != "packed":
            self.entry = None
        if path != "planar":
            self.planar_entry = None
        if path != "dense":
            self.dense_entry = None


# -- which path a channels_last inference convolution takes, measured ----------------------------------

# A channels_last inference convolution can run two ways through oneDNN: on the channels_last
# activations with the pre-packed weight ("packed"), or converted to NCHW with the plain weight and its
# output converted back ("planar": oneDNN then reorders the activations to its blocked layout itself);
# and, on a map about as small as the kernel's reach, as one dense GEMM ("dense", see _dense_conv). Which is faster depends
# on the geometry and on the CPU, in both directions (ResNet-18, batch 16, 512 channels at 2x2: on an
# Intel Xeon 3.3 ms packed, 2.6 ms planar; on an AMD EPYC the channels_last path needed the packed
# weight to come down from 14.5 ms to 2.3 ms; 64 channels at 16x16 on the Intel host: packed 1.3 ms,
# planar 1.6 ms). So, as cudnn.benchmark does for cuDNN's algorithms, the first call of each geometry
# times each (interleaved, after one warm-up call each, the best of MEASURE_ROUNDS) and every later
# call takes the fastest. All give the same values (up to the last bits of fp32 rounding); the output
# keeps the input's layout on every path.
MEASURE_ROUNDS = 3
_choices: dict = {}  # geometry key -> "packed" | "planar" | "dense"
_forced: Optional[str] = None  # tests pin one path: "packed", "planar" or "dense" (where it applies)


def _key(x: Tensor, weight: Tensor, kind: str, stride, padding, dilation, groups) -> tuple:
    return (tuple(x.shape), x.dtype, tuple(weight.shape), kind, tuple(stride), tuple(padding), tuple(dilation),
            groups, torch.get_num_threads())


def _measure(key: tuple, paths: dict) -> tuple:
    """(output, name) of the fastest of `paths` ({name: call}), recorded for `key`."""
    choice, out = _measured.fastest(paths, MEASURE_ROUNDS)
    _choices[key] = choice
    return out[choice], choice


def chosen_paths() -> dict:
    """{geometry key: "packed" | "planar" | "dense"}: what the measured choice picked so far in this process."""
    return dict(_choices)


def _pointwise(x: Tensor, w: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups, relu: bool) -> Tensor:
    return torch.ops.mkldnn._convolution_pointwise(x, w, bias, list(padding), list(stride), list(dilation),
                                                   groups, "relu" if relu else "none", [], "")


def _pointwise_add_relu(x: Tensor, residual: Tensor, w: Tensor, bias: Optional[Tensor], stride, padding, dilation,
                        groups) -> Tensor:
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, w, bias, list(padding), list(stride), list(dilation), groups, "add", 1.0, "relu", [], "")


def _inference_conv(inputs: tuple, weight: Tensor, bias: Optional[Tensor], conv_args: tuple,
                    packed: Optional[PackedWeight], choose: bool, kind: str) -> Tensor:
    """The post-op convolution `kind` ("none" | "relu" | "add_relu", inputs (x,) or (x, residual)) with
    the weight as the path wants it: as it is (no `packed`, or a case packing does not serve), packed,
    or -- with `choose` -- the measured fastest of packed, planar (the inputs NCHW-contiguous, the
    output converted back to channels_last) and, where the map is small enough, the dense GEMM."""
    x = inputs[0]
    stride, padding, dilation, groups = conv_args

    def call(call_inputs, w):
        if kind == "add_relu":
            return _pointwise_add_relu(*call_inputs, w, bias, *conv_args)
        return _pointwise(*call_inputs, w, bias, *conv_args, kind == "relu")

    if packed is None or not PackedWeight.applies(weight, x):
        return call(inputs, weight)

    def packed_path():
        return call(inputs, packed._packed(weight, x, padding, stride, dilation, groups))

    if not choose:
        return packed_path()

    def planar_path():
        planar_inputs = tuple(t.contiguous() for t in inputs)
        return call(planar_inputs, packed.planar(weight)).contiguous(memory_format=torch.channels_last)

    def dense_path():
        residual = inputs[1] if kind == "add_relu" else None
        out_hw = _dense_conv.conv_out_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
        return _dense_conv.conv2d(x, packed.dense(weight, x, conv_args), bias, out_hw, True, kind != "none", residual)

    paths = {"packed": packed_path, "planar": planar_path, "dense": dense_path}
    key = _key(x, weight, kind, *conv_args)
    choice = _forced or _choices.get(key)
    if _forced == "dense" and not _dense_conv.applies(x, weight, *conv_args):  # a test's pin, where it applies
        choice = "packed"
    if choice is not None:
        return paths[choice]()
    if not _dense_conv.applies(x, weight, *conv_args):
        del paths["dense"]
    out, choice = _measure(key, paths)
    packed.keep_only(choice)  # the measurement made every path's weight: keep the one the chosen path reads
    return out


def conv2d_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int, relu: bool, packed: Optional[PackedWeight] = None,
                choose: bool = False) -> Tensor:
    """relu?(conv2d(x)) as one oneDNN call (check `usable` first). `packed`: the weight is a constant
    (inference): a channels_last input takes the packed path, or with `choose` the faster of the packed
    and the planar path (see above). torchfast's own modules do not choose: their networks keep the
    activations channels_last from the stem to the head, never converted between layers."""
    args = (stride, padding, dilation, groups)
    return _inference_conv((x,), weight, bias, args, packed, choose, "relu" if relu else "none")


def conv2d_add_relu(x: Tensor, residual: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int], groups: int,
                    packed: Optional[PackedWeight] = None, choose: bool = False) -> Tensor:
    """relu(conv2d(x) + residual) as one oneDNN call (check `usable` first); `packed` and `choose` as for
    conv2d_relu (the residual in the input's layout)."""
    args = (stride, padding, dilation, groups)
    return _inference_conv((x, residual), weight, bias, args, packed, choose, "add_relu")
