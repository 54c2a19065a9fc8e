"""ReLU -> max pooling as one layer: torchfast.nn.ReLUMaxPool2d (torchfast's relu_max_pool2d kernel)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchfast.nn.functional import relu_max_pool2d

__all__ = ["ReLUMaxPool2d", "pool_window"]


def _as_pair(v) -> list:
    return [v, v] if isinstance(v, int) else list(v)


def window_of(pool: nn.MaxPool2d) -> Optional[tuple]:
    """(kernel_size, stride, padding) of a max pool that relu_max_pool2d computes (dilation 1, floor
    mode, no indices returned, windows of at most 256 elements), else None."""
    if pool.return_indices or pool.ceil_mode or _as_pair(pool.dilation) != [1, 1]:
        return None
    kernel = _as_pair(pool.kernel_size)
    stride = kernel if pool.stride is None or pool.stride == () or pool.stride == [] else _as_pair(pool.stride)
    padding = _as_pair(pool.padding)
    if len(kernel) != 2 or kernel[0] * kernel[1] > 256 or any(2 * p > k or p < 0 for p, k in zip(padding, kernel)):
        return None
    return kernel, stride, padding


def pool_window(pool: Optional[nn.Module]) -> Optional[tuple]:
    """window_of a plain nn.MaxPool2d (what a ReLU before it can join), else None."""
    return window_of(pool) if type(pool) is nn.MaxPool2d else None


class ReLUMaxPool2d(nn.MaxPool2d):
    """max_pool2d(relu(x)) with nn.MaxPool2d's constructor (and, like it, no state): what
    torchfast.convert puts in place of an nn.ReLU -> nn.MaxPool2d run (the ReLU becoming nn.Identity).
    One pass instead of two (max pooling commutes with ReLU, gradients included: the same values and
    gradients as the two layers), a one-byte argmax instead of torch's int64 indices, and on NCHW CPU
    inputs a vectorised kernel where torch's pool is scalar (see torchfast.ops.pool.fused_pays).
    Windows the kernel does not take (dilation, ceil_mode, return_indices) and torch.compile (inductor
    fuses the two itself) run torch's ReLU and pool."""

    def forward(self, input: Tensor):
        window = window_of(self)
        # (a torch.fx Proxy is not a Tensor: tracing records torch's ReLU and pool)
        if window is None or not isinstance(input, Tensor) or input.dim() not in (3, 4) or \
                torch.compiler.is_compiling():
            return F.max_pool2d(F.relu(input), self.kernel_size, self.stride, self.padding, self.dilation,
                                ceil_mode=self.ceil_mode, return_indices=self.return_indices)
        return relu_max_pool2d(input, *window, relu=True)
