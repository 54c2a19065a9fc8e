"""Training convolutions on small output maps through im2col and GEMMs (CPU fp32), where measured faster.

oneDNN's convolution backward is slow on maps of a few pixels with many channels: ResNet's last stage
at 64x64 inputs (batch 16, 512 channels, 2x2, 3x3 kernel) takes ~10 ms for the backward of a ~3 ms
forward on an Intel Xeon (2 threads). Written as unfold -> GEMM, the forward, the input gradient and
the weight gradient are three GEMMs of the batch's output pixels against the weight matrix
([N*Ho*Wo, C_in*kh*kw] x [C_in*kh*kw, C_out] and its transposes), all three at BLAS speed, and the
weight gradient comes out in the weight's own layout; the unfolded input is small on such maps.
Which is faster depends on the geometry and on the CPU, so, as for the inference paths in `_onednn`,
the first training call of each geometry times both (forward + backward on copies of the inputs, the
best of MEASURE_ROUNDS after a warm-up) and every later call takes the faster. Both are autograd
graphs of torch ops: double backward, DDP and anomaly mode see nothing unusual.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchfast.nn import _dense_conv, _measured
from torchfast.ops._registry import autograd_transforms_active, exporting
from torchfast.reference.pool import is_channels_last

# Measured only for outputs up to this many pixels per sample: on larger maps the unfolded input is
# large and im2col loses (1.2-4x slower, forward + backward, at 4x4-16x16 outputs on the Intel host).
MAX_OUT_PIXELS = 4
MEASURE_ROUNDS = 3
_choices: dict = {}  # geometry key -> "conv" | "im2col"
_forced: Optional[str] = None  # tests pin one path


def candidate(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether this training call of `conv` (an nn.Conv2d whose class's forward is nn.Conv2d's: the
    caller's check; none set on the instance) is one the im2col path serves and is worth measuring for:
    zero padding, no groups, a 4D CPU fp32 input whose output map is small, plain tensors, a gradient
    to compute, no global module hooks (which the module call would fire), outside autocast,
    compilation, export, tracing and torch.func transforms."""
    return _served_out_hw(conv, x) is not None


def _served_out_hw(conv: nn.Conv2d, x: Tensor) -> Optional[tuple]:
    """The output map size where `candidate` holds, else None. The cheap tests first: every training
    convolution comes through here, and most are rejected by their map size."""
    if not (type(x) is Tensor and x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32
            and conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)):
        return None
    out_hw = _dense_conv.conv_out_hw(x.shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    if not 0 < out_hw[0] * out_hw[1] <= MAX_OUT_PIXELS:
        return None
    hooks = nn.modules.module
    if not ("forward" not in conv.__dict__ and type(conv.weight) in (nn.Parameter, Tensor)
            and conv.weight.dtype == torch.float32
            and torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling() and not exporting()
            and not torch.jit.is_tracing() and not autograd_transforms_active()
            and not (hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                     or hooks._global_backward_hooks or hooks._global_backward_pre_hooks)):
        return None
    return out_hw


def im2col_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
                  out_hw: tuple) -> Tensor:
    """conv2d(x, weight, bias) as unfold and one GEMM; the output in x's layout."""
    n, c_out = x.size(0), weight.size(0)
    ho, wo = out_hw
    cols = F.unfold(x, weight.shape[2:], dilation, padding, stride)  # [N, C_in*kh*kw, Ho*Wo]
    rows = cols.transpose(1, 2).reshape(n * ho * wo, cols.size(1))
    matrix = weight.reshape(c_out, -1).t()
    flat = torch.mm(rows, matrix) if bias is None else torch.addmm(bias, rows, matrix)
    out = flat.view(n, ho, wo, c_out).permute(0, 3, 1, 2)  # channels_last memory
    return out if is_channels_last(x) else out.contiguous()


def _key(conv: nn.Conv2d, x: Tensor) -> tuple:
    return (tuple(x.shape), is_channels_last(x), tuple(conv.weight.shape),
            conv.bias is None, conv.stride, conv.padding, conv.dilation, torch.get_num_threads())


def _measure(key: tuple, paths: dict, x: Tensor, conv: nn.Conv2d) -> str:
    """The faster of `paths` ({name: f(x, weight, bias)}), forward + backward on copies, recorded."""
    xs = x.detach().clone().requires_grad_(x.requires_grad)
    ws = conv.weight.detach().clone().requires_grad_(conv.weight.requires_grad)
    bs = None if conv.bias is None else conv.bias.detach().clone().requires_grad_(conv.bias.requires_grad)

    def step(path):
        xs.grad = ws.grad = None
        if bs is not None:
            bs.grad = None
        out = path(xs, ws, bs)
        out.backward(torch.ones_like(out))  # (not random: the caller's random stream stays as it was)

    choice, _ = _measured.fastest({name: (lambda p=path: step(p)) for name, path in paths.items()}, MEASURE_ROUNDS)
    _choices[key] = choice
    return choice


def conv2d(conv: nn.Conv2d, x: Tensor, plain: Callable[[Tensor], Tensor]) -> Tensor:
    """conv's output for x in training: through im2col where `candidate` and the measurement say so,
    else plain(x) (the module call, or nn.Conv2d's forward)."""
    out_hw = _served_out_hw(conv, x)
    if out_hw is None:
        return plain(x)
    args = (conv.stride, conv.padding, conv.dilation)
    paths = {"conv": lambda x_, w, b: F.conv2d(x_, w, b, *args),
             "im2col": lambda x_, w, b: im2col_conv2d(x_, w, b, *args, out_hw)}
    key = _key(conv, x)
    choice = _forced or _choices.get(key)
    if choice is None:
        choice = _measure(key, paths, x, conv) if _can_measure() else "conv"
    return paths[choice](x, conv.weight, conv.bias)


def _can_measure() -> bool:
    """Whether a forward + backward on copies may run here: not inside a backward (a reentrant
    checkpoint's recomputation) and not under saved-tensor hooks (torch.utils.checkpoint,
    save_on_cpu), which would take the copies' saved tensors for their own. Elsewhere the call takes
    torch's convolution and the measurement waits for a later call."""
    return (torch._C._current_graph_task_id() == -1
            and torch._C._autograd._top_saved_tensors_default_hooks(False) is None)


def chosen_paths() -> dict:
    """{geometry key: "conv" | "im2col"}: what the measured choice picked so far in this process."""
    return dict(_choices)
