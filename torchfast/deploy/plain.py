"""The plain-PyTorch form of a model built from torchfast's fused layers, for tools that pattern-match
torch's own modules and ops (quantizers above all): conv -> BN -> (add) -> ReLU as separate torch
modules, BN optionally folded into the convolution before it, nn.MultiheadAttention for torchfast's."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from torchfast.nn import attention as fused_attention
from torchfast.nn import layers as fused
from torchfast.reference import modules as reference


class PlainBatchNormReLU2d(nn.BatchNorm2d):
    """relu(nn.BatchNorm2d(x)) as two torch ops (BatchNormReLU2d's plain form, same state_dict)."""

    def forward(self, input: Tensor) -> Tensor:
        return torch.relu(super().forward(input))


class PlainBatchNormAddReLU2d(nn.BatchNorm2d):
    """relu(nn.BatchNorm2d(x) + residual) as torch ops (BatchNormAddReLU2d's plain form)."""

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        return torch.relu(super().forward(input) + residual)


class _PlainSequential(nn.Sequential):
    """ConvBNReLU2d's plain form: its children ("0", "1", "2") run one after another."""


# Fused class -> the plain class with the same attributes, submodules and state_dict keys.
_PLAIN_CLASS = {
    fused.ResidualBlock: reference.ResidualBlock,
    fused.ConvBNReLU2d: _PlainSequential,
    fused.BatchNormReLU2d: PlainBatchNormReLU2d,
    fused.BatchNormAddReLU2d: PlainBatchNormAddReLU2d,
    fused_attention.MultiheadAttention: nn.MultiheadAttention,
}

# (conv, bn) child names of the plain forms whose batch norm follows the convolution directly.
_CONV_BN_PAIRS = {reference.ResidualBlock: (("conv1", "bn1"), ("conv2", "bn2")), _PlainSequential: (("0", "1"),)}


def to_plain(model: nn.Module, *, fold_bn: bool = False, inplace: bool = False) -> nn.Module:
    """`model` (a copy unless `inplace`) with every torchfast fused layer replaced by its plain torch
    form (same parameters and state_dict keys). `fold_bn` (eval mode only) folds each batch norm
    that directly follows a convolution into it (the batch norm becomes nn.Identity): what
    quantizers want, and what inference computes."""
    out = model if inplace else copy.deepcopy(model)
    if fold_bn and out.training:
        raise ValueError("to_plain(fold_bn=True): batch norm folds into the convolution only in eval mode; "
                         "call model.eval() first")
    for module in out.modules():
        plain_cls = _PLAIN_CLASS.get(type(module))
        if plain_cls is not None:
            module.__class__ = plain_cls  # same attributes: a subclass/twin with the plain forward
            for attr in ("_folded",):  # the fused forms' inference caches
                module.__dict__.pop(attr, None)
        if fold_bn:
            for conv_name, bn_name in _CONV_BN_PAIRS.get(type(module), ()):
                conv, bn = getattr(module, conv_name), getattr(module, bn_name)
                if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
                    setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                    setattr(module, bn_name, nn.Identity())
    return out
