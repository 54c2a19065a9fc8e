"""Drop-in fused layers: same constructors, state_dict keys and results as the torch stacks (and
the cheat sheet's ResidualBlock) they replace, with batch norm, the residual add and the ReLU in
one fused kernel. The convolutions stay with oneDNN/cuDNN."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from torchfast.nn.functional import batch_norm_add_relu

__all__ = ["BatchNormReLU2d", "BatchNormAddReLU2d", "ConvBNReLU2d", "ResidualBlock", "fused_batch_norm"]


def fused_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor, residual: Optional[Tensor] = None,
                     relu: bool = True) -> Tensor:
    """What `relu(bn(x) + residual)` computes, with nn.BatchNorm's own bookkeeping
    (num_batches_tracked, momentum=None as a cumulative average, track_running_stats)."""
    bn._check_input_dim(x)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return batch_norm_add_relu(x, bn.running_mean if track else None, bn.running_var if track else None,
                               bn.weight, bn.bias, residual, use_batch_stats, factor, bn.eps, relu)


class BatchNormReLU2d(nn.BatchNorm2d):
    """nn.BatchNorm2d followed by ReLU (same arguments and state_dict as nn.BatchNorm2d)."""

    def forward(self, input: Tensor) -> Tensor:
        return fused_batch_norm(self, input, None, relu=True)


class BatchNormAddReLU2d(nn.BatchNorm2d):
    """relu(nn.BatchNorm2d(x) + residual): forward(x, residual) (state_dict of nn.BatchNorm2d)."""

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        return fused_batch_norm(self, input, residual, relu=True)


class ConvBNReLU2d(nn.Sequential):
    """nn.Sequential(nn.Conv2d(...), nn.BatchNorm2d(out_channels), nn.ReLU()) with the batch norm and
    the ReLU fused: the same children ("0", "1", "2"), so a state_dict of that plain stack loads.
    Takes nn.Conv2d's arguments, then the batch-norm options; relu=False drops the ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, relu=True):
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                            padding_mode, device=device, dtype=dtype),
                  nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device=device,
                                 dtype=dtype)]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)
        self.relu = relu

    def forward(self, input: Tensor) -> Tensor:
        return fused_batch_norm(self[1], self[0](input), None, relu=self.relu)


class ResidualBlock(nn.Module):
    """The cheat sheet's ResidualBlock (conv-BN-ReLU-conv-BN, + input, ReLU), same constructor and
    submodules (conv1, bn1, relu, conv2, bn2; convs with bias), so its state_dict loads unchanged."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.size(1) != self.channels:
            raise ValueError(f"torchfast.nn.ResidualBlock({self.channels}): expected input of shape "
                             f"(N, {self.channels}, H, W), got {tuple(x.shape)}")
        out = fused_batch_norm(self.bn1, self.conv1(x), None, relu=True)
        return fused_batch_norm(self.bn2, self.conv2(out), x, relu=True)
