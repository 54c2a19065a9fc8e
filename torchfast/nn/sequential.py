"""An nn.Sequential whose Conv2d -> BatchNorm2d pairs fold in inference: what torchfast.convert makes of
a plain Sequential stack (VGG- or MobileNet-style features) with conv -> BN (-> ReLU) runs."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from torchfast.nn import layers as fused

__all__ = ["FusedSequential"]

_BATCH_NORMS = (nn.BatchNorm2d, fused.BatchNormReLU2d)


def _folds(conv: nn.Module, bn: nn.Module) -> bool:
    # (checked on every call: a user may put other layers in since)
    return type(conv) is nn.Conv2d and type(bn) in _BATCH_NORMS


class FusedSequential(nn.Sequential):
    """nn.Sequential (same children, indexing, state_dict) whose forward hands each Conv2d directly
    followed by a BatchNorm2d / BatchNormReLU2d to `conv_bn_relu`: in inference the batch norm is
    folded into the convolution (and a BatchNormReLU2d's ReLU runs as its oneDNN post-op), one pass
    instead of two or three; in training, with hooks, under autocast, the two modules run as they
    are. Calling a child on its own is unchanged."""

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):  # traced: each child's call recorded, as nn.Sequential's
            return super().forward(input)
        mods = list(self._modules.values())
        i = 0
        while i < len(mods):
            if i + 1 < len(mods) and _folds(mods[i], mods[i + 1]):
                input = fused.conv_bn_relu(input, mods[i], mods[i + 1])
                i += 2
            else:
                input = mods[i](input)
                i += 1
        return input


def fold_pairs(seq: nn.Sequential) -> list:
    """(conv name, bn name) for each Conv2d -> batch norm pair FusedSequential would fold in `seq`."""
    names = list(seq._modules)
    pairs, i = [], 0
    while i + 1 < len(names):
        if _folds(seq._modules[names[i]], seq._modules[names[i + 1]]):
            pairs.append((names[i], names[i + 1]))
            i += 2
        else:
            i += 1
    return pairs
