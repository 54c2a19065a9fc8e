"""Functional forms of torchfast's fused layers."""
from __future__ import annotations

from typing import Optional

import math

import torch
from torch import Tensor

from torchfast.ops import attention as attention_ops
from torchfast.ops import norm as norm_ops
from torchfast.ops import pool as pool_ops
from torchfast.ops._registry import exporting

__all__ = ["batch_norm_add_relu", "relu_max_pool2d", "scaled_dot_product_attention"]


def batch_norm_add_relu(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                        residual: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1,
                        eps: float = 1e-5, relu: bool = True) -> Tensor:
    """relu?(F.batch_norm(input, ...) + residual?) in one fused pass (two for the statistics).

    Same arguments and running-statistics semantics as torch.nn.functional.batch_norm (training
    updates running_mean/running_var in place with `momentum`, running_var unbiased), plus the
    optional residual added before the ReLU and the ReLU switch.
    """
    if input.dim() < 2:
        raise ValueError(f"batch_norm_add_relu: expected input of shape (N, C, *), got {tuple(input.shape)}")
    c = input.size(1)
    # Checked before anything is updated in place (torch's messages).
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != c:
            raise RuntimeError(f"batch_norm_add_relu: {name} should contain {c} elements not {t.numel()} "
                               f"(input of shape {tuple(input.shape)})")
    if residual is not None and residual.shape != input.shape:
        try:  # a residual that broadcasts to the input (as in relu(bn(x) + r)) is expanded to it
            residual = residual.expand(input.shape)
        except RuntimeError:
            raise ValueError(f"batch_norm_add_relu: residual of shape {tuple(residual.shape)} does not broadcast "
                             f"to the input's {tuple(input.shape)}") from None
    use_batch_stats = training or running_mean is None or running_var is None
    out, mean, _, var = norm_ops.bn_add_relu(
        input, weight, bias, residual, None if use_batch_stats else running_mean,
        None if use_batch_stats else running_var, use_batch_stats, eps, relu)
    n = input.numel() // c if c else 0
    if training and running_mean is not None and running_var is not None and n > 0:  # torch skips empty batches
        with torch.no_grad():  # (1 - momentum) * running + momentum * batch, one op each
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (n / max(n - 1, 1))).to(running_var.dtype), momentum)
    return out


def additive_mask(mask: Optional[Tensor], dtype: torch.dtype, true_attends: bool = True,
                  name: str = "attn_mask") -> Optional[Tensor]:
    """A boolean mask as 0/-inf in `dtype` (True = attend, as scaled_dot_product_attention; with
    true_attends=False, True = masked out, as nn.MultiheadAttention); a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        blocked = ~mask if true_attends else mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(blocked, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
    return mask


def _draw_dropout_seed() -> Tensor:
    """A seed from torch's default generator: torch.manual_seed(s) makes dropout reproducible."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention on torchfast's flash-attention kernels.

    Same signature and results: query (..., L, E), key (..., S, E), value (..., S, Ev); attn_mask
    boolean (True = take part in attention) or additive float, broadcastable to (..., L, S);
    is_causal masks key j > query i (top-left aligned; it may be combined with attn_mask, where torch
    raises); batch dims broadcast (ranks may differ, as in torch: query (B, L, E) with key/value
    (A, B, S, E)); scale defaults to 1/sqrt(E); enable_gqa
    lets key/value have fewer heads (dim -3) than query. The (L, S) scores are never materialised,
    and rows whose every key is masked give 0 with zero gradients (older torch gave NaN). dropout_p > 0 draws its
    mask from a seed taken from torch's default generator, so torch.manual_seed reproduces it; the
    mask differs from torch's own dropout draws (same distribution). An attn_mask that requires
    grad runs on the reference (the kernels give no mask gradient).
    """
    name = "scaled_dot_product_attention"
    shapes = f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"  # as received, for errors
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise ValueError(f"{name}: query, key and value must have rank >= 2, got shapes {shapes}")
    if query.size(-1) != key.size(-1) or key.size(-2) != value.size(-2):
        raise ValueError(f"{name}: expected query (..., L, E), key (..., S, E), value (..., S, Ev); got {shapes}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{name}: dropout_p must be in [0, 1], got {dropout_p}")
    device_type = query.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        # as torch's SDPA under autocast: fp32/fp16/bf16 operands (and a float mask) in the autocast dtype
        low = torch.get_autocast_dtype(device_type)
        cast = lambda t: t.to(low) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        query, key, value, attn_mask = cast(query), cast(key), cast(value), cast(attn_mask)
    if enable_gqa and query.dim() >= 3 and key.dim() >= 3 and key.size(-3) != query.size(-3):
        groups, rem = divmod(query.size(-3), key.size(-3))
        if rem:
            raise ValueError(f"{name}: with enable_gqa, query heads ({query.size(-3)}) must be a multiple of "
                             f"key/value heads ({key.size(-3)})")
        key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
    try:  # batch dims broadcast, as in torch (expanded views; the 4-D kernels read them in place)
        lead = _broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    except RuntimeError:
        raise ValueError(f"{name}: the batch dims of query, key and value do not broadcast: {shapes}") from None
    query, key, value = (t.expand(*lead, t.size(-2), t.size(-1)) for t in (query, key, value))
    L, S = query.size(-2), key.size(-2)
    mask = additive_mask(attn_mask, query.dtype)
    if mask is not None:
        try:
            _broadcast_shapes(mask.shape, (*lead, L, S))
        except RuntimeError:
            raise ValueError(f"{name}: attn_mask of shape {tuple(mask.shape)} does not broadcast to "
                             f"{(*lead, L, S)}") from None
    if mask is not None and mask.dim() > query.dim():
        extra = mask.dim() - query.dim()  # leading size-1 dims broadcast away, as in torch
        if any(d != 1 for d in mask.shape[:extra]):
            raise ValueError(f"{name}: attn_mask of shape {tuple(mask.shape)} has more dims than the inputs "
                             f"({shapes})")
        mask = mask.reshape(mask.shape[extra:])
    if query.dim() != 4:  # fold the batch dims into one (B, 1, L, E) problem
        n = math.prod(lead)
        if mask is not None:
            mask = mask.expand(*lead, L, S).reshape(n, 1, L, S)
        query, key, value = (t.reshape(n, 1, t.size(-2), t.size(-1)) for t in (query, key, value))
    if scale is None:  # (a zero-width head scores 0 everywhere whatever the scale: uniform weights, as torch)
        scale = 1.0 / math.sqrt(query.size(-1)) if query.size(-1) > 0 else 1.0
    scale = float(scale)
    seed = _draw_dropout_seed() if dropout_p > 0.0 else None
    out, _ = attention_ops.flash_attention(query, key, value, mask, is_causal, scale, dropout_p, seed)
    return out.reshape(*lead, L, value.size(-1))


def _broadcast_shapes(*shapes) -> tuple:
    """torch.broadcast_shapes for concrete shapes, in Python: torch's imports sympy (through
    torch.fx.experimental.symbolic_shapes) on its first call, half a second of a process's start-up.
    Traced shapes (torch.compile, export) take torch's. Raises RuntimeError as torch's does."""
    if torch.compiler.is_compiling() or any(not isinstance(d, int) for shape in shapes for d in shape):
        return tuple(torch.broadcast_shapes(*shapes))
    out: list = []
    for shape in shapes:
        shape = tuple(shape)
        if len(shape) > len(out):
            out = [1] * (len(shape) - len(out)) + out
        for i, d in enumerate(shape, start=len(out) - len(shape)):
            if d != out[i] and d != 1:
                if out[i] != 1:
                    raise RuntimeError(f"shapes {shapes} do not broadcast")
                out[i] = d
    return tuple(out)


def _pair(value, name: str) -> list:
    values = [value, value] if isinstance(value, int) else list(value)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(isinstance(v, int) for v in values):
        raise ValueError(f"relu_max_pool2d: {name} must be an int or a pair of ints, got {value!r}")
    return values


def relu_max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, relu: bool = True) -> Tensor:
    """F.max_pool2d(F.relu(input), kernel_size, stride, padding) in one pass (max pooling commutes
    with ReLU, gradients included): the same values and gradients as those two torch ops, for
    (N, C, H, W) or (C, H, W) inputs, contiguous or channels_last (the output keeps the layout).
    Its backward keeps one byte per output (the maximum's place in its window) instead of torch's
    int64 index, and writes each input gradient once. relu=False is plain max pooling. Dilation and
    ceil_mode are F.max_pool2d's (not taken here). While a model is exported, and for NCHW fp16/bf16
    inputs on the CPU (where they are the faster), the two torch ops run."""
    kernel = _pair(kernel_size, "kernel_size")
    strides = kernel if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _pair(stride, "stride")
    pads = _pair(padding, "padding")
    if input.dim() not in (3, 4):
        raise ValueError(f"relu_max_pool2d: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got shape "
                         f"{tuple(input.shape)}")
    if input.dim() == 3:
        return relu_max_pool2d(input.unsqueeze(0), kernel, strides, pads, relu).squeeze(0)
    if exporting() or not pool_ops.fused_pays(input) or kernel[0] * kernel[1] > 256:
        # exporting: the canonical ReLU -> MaxPool, which exporters and quantizers pattern-match;
        # NCHW fp16/bf16 on the CPU: torch's two ops are the faster there (see ops/pool.py); windows of over
        # 256 elements: beyond the kernel's one-byte argmax
        x = torch.relu(input) if relu else input
        return torch.nn.functional.max_pool2d(x, kernel, strides, pads)
    return pool_ops.relu_max_pool2d(input, kernel, strides, pads, relu)[0]
