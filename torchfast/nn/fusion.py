"""Convolution + ReLU as one oneDNN call, in inference and in training, for any nn.Conv2d followed
by a ReLU (the stem and the transitions of a network, not only inside ResidualBlock).

Forward: `mkldnn._convolution_pointwise` with a ReLU post-op (the ReLU runs while the output tile is
in cache; no separate pass, no extra activation tensor). Backward (training): the ReLU's mask is
read off the output (out > 0, as for torch's ReLU), then torch's own convolution backward. Where the
oneDNN op does not apply (not CPU fp32, small inputs, traced, string padding, hooks, autocast) the
plain conv + ReLU run instead.

A following nn.MaxPool2d joins them as torchfast's relu_max_pool2d (csrc/pool): after the post-op
convolution it pools the ReLU's output, and its backward applies the ReLU's mask and routes each
window's gradient in one pass (no threshold_backward, no int64 indices, the convolution's output not
kept for backward); after a plain convolution (CUDA, other dtypes) it is the ReLU and the pool in one
kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchfast.nn import _onednn
from torchfast.nn.functional import relu_max_pool2d
from torchfast.nn.pooling import pool_window
from torchfast.ops import pool as pool_ops
from torchfast.nn.layers import current_weight
from torchfast.sharded.dtensor import version_counters_track_contents
from torchfast.ops._registry import autograd_transforms_active, exporting
from torchfast.reference import pool as ref_pool


class _WeightInLayout:
    """conv.weight in the channels_last layout (what oneDNN wants beside a channels_last input),
    rebuilt when the weight changes (version counter, storage)."""

    def __init__(self):
        self.key, self.weight = None, None
        self.packed = _onednn.PackedWeight()  # inference: the weight as oneDNN wants it (see conv2d_relu)

    def get(self, weight: Tensor) -> Tensor:
        if weight.is_contiguous(memory_format=torch.channels_last):
            return weight
        if not version_counters_track_contents():  # FSDP2: the version says nothing about the values
            return weight.contiguous(memory_format=torch.channels_last)
        try:
            key = (id(weight), weight._version, weight.data_ptr())
        except RuntimeError:  # inference tensors have no version counter
            return weight.contiguous(memory_format=torch.channels_last)
        if key != self.key:
            self.key, self.weight = key, weight.detach().contiguous(memory_format=torch.channels_last)
        return self.weight


class _ConvReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, weight_in_layout):
        out = _onednn.conv2d_relu(x, weight_in_layout, bias, stride, padding, dilation, groups, True)
        ctx.save_for_backward(x, weight, out)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, out = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and \
            not x.is_contiguous() else torch.contiguous_format
        grad = torch.ops.aten.threshold_backward(grad_out.contiguous(memory_format=memory_format), out, 0)
        need = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.size(0)] if has_bias else None, list(stride), list(padding), list(dilation),
            False, [0, 0], groups, [need[0], need[1], has_bias and need[2]])
        return gx, gw, gb, None, None, None, None, None


class _ConvReLUPoolFunction(torch.autograd.Function):
    """pool(relu(conv(x))) with the ReLU as the convolution's post-op; backward: the pool's gradient
    with the ReLU's mask in one kernel, then the convolution's."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, weight_in_layout, window):
        out = _onednn.conv2d_relu(x, weight_in_layout, bias, stride, padding, dilation, groups, True)
        pooled, argmax = pool_ops.relu_max_pool2d(out, *window, False)
        ctx.save_for_backward(x, weight, pooled, argmax)
        ctx.conf = (stride, padding, dilation, groups, bias is not None, window, list(out.shape),
                    ref_pool.is_channels_last(out))
        ctx.mark_non_differentiable(argmax)
        return pooled, argmax

    @staticmethod
    def backward(ctx, grad_pooled, _grad_argmax):
        x, weight, pooled, argmax = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias, window, out_size, channels_last = ctx.conf
        # the ReLU's mask read off the pooled output: a window's maximum passes the ReLU iff it is > 0
        backward = ref_pool.relu_max_pool2d_backward if torch.is_grad_enabled() else pool_ops.relu_max_pool2d_backward
        grad = backward(grad_pooled, pooled, argmax, out_size, *window, True, channels_last)
        need = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.size(0)] if has_bias else None, list(stride), list(padding), list(dilation),
            False, [0, 0], groups, [need[0], need[1], has_bias and need[2]])
        return gx, gw, gb, None, None, None, None, None, None


def _fusable(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether oneDNN's post-op convolution serves this call. Forward-mode AD and torch.func
    transforms take the plain ops (the fused backward is reverse-mode only)."""
    return (conv.padding_mode == "zeros" and _onednn.usable(x, conv.weight, conv.padding)
            and not torch.is_autocast_enabled("cpu") and not autograd_transforms_active())


def _fused_conv_relu(conv: nn.Conv2d, x: Tensor, cache: Optional[_WeightInLayout]) -> Tensor:
    weight = current_weight(conv)  # (a pruned weight as the module's own forward would see it)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    in_layout = (cache.get(weight) if cache is not None else weight.contiguous(memory_format=torch.channels_last)) \
        if channels_last else weight
    if _wants_grad(conv, x):
        return _ConvReLUFunction.apply(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                                       in_layout)
    return _onednn.conv2d_relu(x, in_layout, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, True,
                               cache.packed if cache is not None else None)


def conv2d_relu(conv: nn.Conv2d, x: Tensor, cache: Optional[_WeightInLayout] = None) -> Tensor:
    """relu(conv(x)) for an nn.Conv2d, fused where oneDNN's post-op convolution applies."""
    return _fused_conv_relu(conv, x, cache) if _fusable(conv, x) else F.relu(conv(x))


def conv_relu_pool(conv: nn.Conv2d, pool: Optional[nn.MaxPool2d], x: Tensor,
                   cache: Optional[_WeightInLayout] = None) -> Tensor:
    """pool?(relu(conv(x))) with the ReLU fused: into the convolution as a oneDNN post-op where that
    applies (CPU fp32), else into the pool (torchfast's relu_max_pool2d), else after the pool, on a
    quarter of the elements (exact: max pooling commutes with ReLU, gradients included: the window's
    maximum is the same element either way, and a window whose maximum is <= 0 passes no gradient
    in both orders)."""
    window = pool_window(pool)
    if _fusable(conv, x):
        if window is not None and _wants_grad(conv, x) and pool_ops.kernel_serves(x):
            return _fused_conv_relu_pool(conv, x, cache, window)
        # inference: torch's max pooling is as fast as relu_max_pool2d's forward and keeps no argmax
        out = _fused_conv_relu(conv, x, cache)
        return pool(out) if pool is not None else out
    out = conv(x)
    if pool is None:
        return F.relu(out)
    if window is not None and not torch.compiler.is_compiling() and pool_ops.fused_pays(out):
        # (under torch.compile inductor fuses the plain ReLU and pool itself)
        return relu_max_pool2d(out, *window, relu=True)
    if exporting():  # the canonical conv -> ReLU -> pool, which exporters and quantizers pattern-match
        return pool(F.relu(out))
    return F.relu(pool(out), inplace=True)  # the pool's output is fresh (its backward keeps only indices)


def _wants_grad(conv: nn.Conv2d, x: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or current_weight(conv).requires_grad or
                                        (conv.bias is not None and conv.bias.requires_grad))


def _fused_conv_relu_pool(conv: nn.Conv2d, x: Tensor, cache: Optional[_WeightInLayout], window: tuple) -> Tensor:
    """Training: the post-op convolution, relu_max_pool2d, and one backward for both."""
    weight = current_weight(conv)
    in_layout = (cache.get(weight) if cache is not None else weight.contiguous(memory_format=torch.channels_last)) \
        if ref_pool.is_channels_last(x) else weight
    return _ConvReLUPoolFunction.apply(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                                       in_layout, window)[0]


def _is(m, cls) -> bool:
    return type(m) is cls


def run_fused(seq: nn.Sequential, x: Tensor, caches: dict, memory_format: Optional[torch.memory_format] = None) -> Tensor:
    """seq(x), each Conv2d -> ReLU (-> MaxPool2d) run of children as one conv_relu_pool. `caches`
    holds the channels_last weights per convolution (by child index). With `memory_format`, each
    fused run's output is kept in it: a convolution whose input has one channel cannot tell the
    layouts apart and answers in NCHW; its (pooled) output is converted once, there."""
    mods = list(seq)
    i = 0
    while i < len(mods):
        m = mods[i]
        if _is(m, nn.Conv2d) and i + 1 < len(mods) and _is(mods[i + 1], nn.ReLU):
            pool = mods[i + 2] if i + 2 < len(mods) and _is(mods[i + 2], nn.MaxPool2d) and \
                not mods[i + 2].return_indices else None
            x = conv_relu_pool(m, pool, x, caches.setdefault(i, _WeightInLayout()))
            if memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
            i += 3 if pool is not None else 2
        else:
            x = m(x)
            i += 1
    return x
