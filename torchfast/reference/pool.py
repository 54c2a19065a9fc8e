"""Pure-PyTorch references of the ReLU + max-pooling ops (same contracts as csrc/torchfast.cpp)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _window_origins(out_size: int, stride: int, padding: int, device) -> Tensor:
    return torch.arange(out_size, device=device) * stride - padding


def relu_max_pool2d(input: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                    relu: bool) -> tuple[Tensor, Tensor]:
    """(relu?(max_pool2d(input)), argmax): argmax is the maximum's position inside its window
    (uint8, row * kernel_w + col), both in the input's layout; `out` is differentiable."""
    out, flat = F.max_pool2d(input, list(kernel_size), list(stride), list(padding), return_indices=True)
    if relu:
        out = F.relu(out)
    width = input.size(-1)
    oh, ow = out.shape[-2:]
    rows = flat.div(width, rounding_mode="floor") - _window_origins(oh, stride[0], padding[0], flat.device).view(-1, 1)
    cols = flat.remainder(width) - _window_origins(ow, stride[1], padding[1], flat.device).view(1, -1)
    argmax = (rows * kernel_size[1] + cols).to(torch.uint8)
    fmt = _layout(is_channels_last(input))
    return out.contiguous(memory_format=fmt), argmax.contiguous(memory_format=fmt)


def relu_max_pool2d_backward(grad_out: Tensor, out: Tensor, argmax: Tensor, input_size: Sequence[int],
                             kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], relu: bool,
                             channels_last: bool) -> Tensor:
    """The input gradient: each window's gradient at its maximum (none where relu and out <= 0)."""
    width = input_size[-1]
    oh, ow = out.shape[-2:]
    window = argmax.long()
    rows = window.div(kernel_size[1], rounding_mode="floor") + \
        _window_origins(oh, stride[0], padding[0], out.device).view(-1, 1)
    cols = window.remainder(kernel_size[1]) + _window_origins(ow, stride[1], padding[1], out.device).view(1, -1)
    flat = (rows * width + cols).contiguous()
    grad = grad_out.masked_fill(out <= 0, 0) if relu else grad_out
    shape_of_input = out.new_empty(list(input_size))  # read for its shape only
    grad_in = torch.ops.aten.max_pool2d_with_indices_backward(grad.contiguous(), shape_of_input, list(kernel_size),
                                                              list(stride), list(padding), [1, 1], False, flat)
    return grad_in.contiguous(memory_format=_layout(channels_last))
