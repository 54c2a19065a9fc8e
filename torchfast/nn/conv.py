"""torchfast.nn.Conv2d: nn.Conv2d whose CPU inference hands oneDNN a pre-packed weight."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from torchfast.nn import _onednn, _train_conv
from torchfast.ops._registry import autograd_transforms_active
from torchfast.reference.pool import is_channels_last

__all__ = ["Conv2d"]


class Conv2d(nn.Conv2d):
    """nn.Conv2d with the same constructor, state_dict and results. In CPU fp32 inference on channels_last
    inputs (no gradient recorded, from 16K input elements, zero padding) the weight goes to oneDNN pre-packed for the
    input's geometry (`_onednn.PackedWeight`, rebuilt when the weight or the geometry changes) instead
    of being reordered inside every call, which for few input channels or small images costs as much as
    the convolution (measured: a 3 -> 64 3x3 stem at batch 32, 32x32, channels_last: 3.1 ms -> 0.8 ms).
    Training runs nn.Conv2d's forward, or on small output maps on the CPU the im2col + GEMM form where
    it measured faster (`_train_conv`); autocast, torch.compile / export, other devices and dtypes run
    nn.Conv2d's forward.
    What torchfast.convert puts in place of the nn.Conv2d layers it does not fold into a batch norm."""

    def forward(self, input: Tensor) -> Tensor:
        # (a torch.fx Proxy is not a Tensor: tracing records nn.Conv2d's forward)
        # (NCHW inputs too: the packed path answers in channels_last, see PackedWeight)
        if torch.is_grad_enabled() and isinstance(input, Tensor):  # small output maps: maybe im2col
            return _train_conv.conv2d(self, input, super().forward)
        if not isinstance(input, Tensor) or self.padding_mode != "zeros" or \
                not _onednn.CAN_PACK or not _onednn.usable(input, self.weight, self.padding) or \
                not is_channels_last(input) or \
                torch.is_autocast_enabled("cpu") or autograd_transforms_active():
            return super().forward(input)
        packed = self.__dict__.get("_torchfast_packed")
        if packed is None:
            packed = self._torchfast_packed = _onednn.PackedWeight()
        return _onednn.conv2d_relu(input, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                   self.groups, False, packed, choose=True)
