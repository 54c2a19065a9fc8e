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
from torchfast.nn.absorbed import AbsorbedReLU, absorbed_relu, release_relu
from torchfast.nn.conv import Conv2d as PackedConv2d
from torchfast.nn.pooling import ReLUMaxPool2d
from torchfast.nn.sequential import FusedSequential, fold_pairs
from torchfast.reference import modules as reference


class PlainBatchNormReLU2d(nn.BatchNorm2d):
    """relu(nn.BatchNorm2d(x)) as two torch ops (BatchNormReLU2d's plain form, same state_dict)."""

    def forward(self, input: Tensor) -> Tensor:
        return torch.relu(super().forward(input))


class PlainBatchNormAddReLU2d(nn.BatchNorm2d):
    """relu(nn.BatchNorm2d(x) + residual) as torch ops (BatchNormAddReLU2d's plain form)."""

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        return torch.relu(super().forward(input) + residual)


class _PlainResidualBlock(reference.ResidualBlock):
    """ResidualBlock's plain form. Its ReLUs are separate calls: the cheat sheet's block calls one
    nn.ReLU module twice, which quantizers that partition the graph by module (PT2E's) read as one
    partition with two outputs, and refuse."""

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class PlainMultiheadAttention(fused_attention.MultiheadAttention):
    """torchfast.nn.MultiheadAttention's plain form: its projections as F.linear calls (what
    quantizers match; torch's nn.MultiheadAttention would take its fused inference op, opaque to them)
    around torch's scaled_dot_product_attention."""

    _sdpa = staticmethod(torch.nn.functional.scaled_dot_product_attention)

    def _linear(self, name: str, weight: Tensor, bias) -> nn.Linear:
        """An nn.Linear sharing `weight`/`bias`: PT2E's quantizers find linears by module (a
        functional F.linear in an exported graph carries no record of its source)."""
        linear = self._modules.get(name)
        if linear is None or linear.weight is not weight:
            linear = nn.Linear(weight.size(1), weight.size(0), bias=bias is not None, device=weight.device,
                               dtype=weight.dtype)
            linear.weight, linear.bias = weight, bias
            self.add_module(name, linear)
        return linear

    def make_linears(self) -> None:
        """Creates the shared-weight nn.Linear modules now, before a graph is exported."""
        if self._qkv_same_embed_dim:
            self._linear("_in_linear", self.in_proj_weight, self.in_proj_bias)
        self._linear("_out_linear", self.out_proj.weight, self.out_proj.bias)

    def _project(self, query: Tensor, key: Tensor, value: Tensor):
        if self._qkv_same_embed_dim and query is key and key is value:
            return self._linear("_in_linear", self.in_proj_weight, self.in_proj_bias)(query).chunk(3, dim=-1)
        return super()._project(query, key, value)

    def _output_projection(self, out: Tensor) -> Tensor:
        return self._linear("_out_linear", self.out_proj.weight, self.out_proj.bias)(out)


class _PlainSequential(nn.Sequential):
    """ConvBNReLU2d's plain form: its children ("0", "1", "2") run one after another."""


class PlainReLUMaxPool2d(nn.MaxPool2d):
    """ReLUMaxPool2d's plain form: torch's ReLU, then nn.MaxPool2d's forward."""

    def forward(self, input: Tensor):
        return super().forward(torch.relu(input))


# Fused class -> the plain class with the same attributes, submodules and state_dict keys.
_PLAIN_CLASS = {
    fused.ResidualBlock: _PlainResidualBlock,
    fused.ConvBNReLU2d: _PlainSequential,
    fused.BatchNormReLU2d: PlainBatchNormReLU2d,
    fused.BatchNormAddReLU2d: PlainBatchNormAddReLU2d,
    fused_attention.MultiheadAttention: PlainMultiheadAttention,
    PackedConv2d: nn.Conv2d,  # (what torchfast.convert leaves of a plain convolution)
    FusedSequential: nn.Sequential,
    ReLUMaxPool2d: PlainReLUMaxPool2d,
}

# (conv, bn) child names of the plain forms whose batch norm follows the convolution directly.
_CONV_BN_PAIRS = {_PlainResidualBlock: (("conv1", "bn1"), ("conv2", "bn2")), _PlainSequential: (("0", "1"),)}


def _restore_absorbed_relus(model: nn.Module) -> None:
    """What torchfast.convert split off: each AbsorbedReLU -> nn.ReLU again, and the layer that applied
    it -> torch's own (BatchNormReLU2d -> nn.BatchNorm2d, ReLUMaxPool2d -> nn.MaxPool2d)."""
    for module in list(model.modules()):
        if absorbed_relu(module) and type(module) in (fused.BatchNormReLU2d, ReLUMaxPool2d):
            module.__class__ = nn.BatchNorm2d if type(module) is fused.BatchNormReLU2d else nn.MaxPool2d
            release_relu(module)
        for name, child in list(module.named_children()):
            if type(child) is AbsorbedReLU:
                setattr(module, name, nn.ReLU(inplace=child.inplace).train(module.training))


def to_plain(model: nn.Module, *, fold_bn: bool = False, inplace: bool = False) -> nn.Module:
    """`model` (a copy unless `inplace`) with every torchfast fused layer replaced by its plain torch
    form (same parameters and state_dict keys). `fold_bn` (eval mode only) folds each batch norm
    that directly follows a convolution into it (the batch norm becomes nn.Identity): what
    quantizers want, and what inference computes. nn.MultiheadAttention modules become
    PlainMultiheadAttention (projections a quantizer can see)."""
    out = model if inplace else copy.deepcopy(model)
    if fold_bn and out.training:
        raise ValueError("to_plain(fold_bn=True): batch norm folds into the convolution only in eval mode; "
                         "call model.eval() first")
    _restore_absorbed_relus(out)
    for module in out.modules():
        sequential_pairs = fold_pairs(module) if type(module) is FusedSequential else None
        plain_cls = _PLAIN_CLASS.get(type(module))
        if plain_cls is None and type(module) is nn.MultiheadAttention:
            plain_cls = PlainMultiheadAttention
        if plain_cls is not None:
            module.__class__ = plain_cls  # same attributes: a subclass/twin with the plain forward
            for attr in ("_folded", "_torchfast_packed"):  # the fused forms' inference caches
                module.__dict__.pop(attr, None)
            if plain_cls is PlainMultiheadAttention:
                module.make_linears()
        if fold_bn:
            pairs = sequential_pairs if sequential_pairs is not None else _CONV_BN_PAIRS.get(type(module), ())
            for conv_name, bn_name in pairs:
                conv, bn = getattr(module, conv_name), getattr(module, bn_name)
                if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
                    setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                    setattr(module, bn_name, nn.Identity())
    return out
