"""Pure-PyTorch flash-attention reference: the fallback where no kernel runs, and the tests' oracle.

It materialises the (L, S) scores (the kernels never do) but computes exactly what they compute,
including the dropout mask: the same counter hash as csrc/attention/attention_math.h, evaluated
with int64 tensors holding 32-bit values (products wrap, and the & keeps the low 32 bits).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mix32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def dropout_threshold(p: float) -> int:
    t = p * 4294967296.0
    return _M32 if t >= 4294967295.0 else int(t + 0.5)


def dropout_keep_mask(seed: int, B: int, H: int, L: int, S: int, p: float, device=None) -> Tensor:
    """Boolean (B, H, L, S): True where the kernels keep a probability under dropout p with `seed`."""
    seed &= (1 << 64) - 1
    lo, hi = seed & _M32, seed >> 32
    bh = torch.arange(B * H, device=device, dtype=torch.int64)
    rows = torch.arange(L, device=device, dtype=torch.int64)
    cols = torch.arange(S, device=device, dtype=torch.int64)
    k = _mix32(lo ^ _mix32((bh + ((hi * 0x9E3779B9) & _M32)) & _M32))  # per batch*head
    row_key = _mix32(k[:, None] ^ ((rows * 0x85EBCA77) & _M32)[None, :])  # (BH, L)
    bits = _mix32(row_key[:, :, None] ^ ((cols * 0x9E3779B1) & _M32)[None, None, :])  # (BH, L, S)
    keep = bits >= dropout_threshold(p) if p < 1.0 else torch.zeros_like(bits, dtype=torch.bool)
    return keep.view(B, H, L, S)


def flash_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                    scale: float, dropout_p: float, rng_seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(out, logsumexp) of torchfast::flash_attention (see csrc/torchfast.cpp), differentiable."""
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k, v = (t.to(compute) for t in (query, key, value))
    B, H, L, _ = q.shape
    S = k.shape[2]
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        scores = scores + attn_mask.to(compute)
    if is_causal:
        visible = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    # A fully masked row (every score -inf) has lse = -inf and probabilities 0, rather than
    # exp(-inf + inf) = NaN; its scores enter the logsumexp as zeros, so that no NaN reaches the
    # gradients either. (A NaN score leaves its row NaN, as in torch and the kernels.)
    dead = ~(scores != float("-inf")).any(-1) if S > 0 else scores.new_ones((B, H, L), dtype=torch.bool)
    lse = torch.logsumexp(scores.masked_fill(dead.unsqueeze(-1), 0.0), dim=-1) if S > 0 else scores.new_zeros((B, H, L))
    probs = torch.exp(scores - lse.unsqueeze(-1)).masked_fill(dead.unsqueeze(-1), 0.0)
    lse = lse.masked_fill(dead, float("-inf"))
    if dropout_p > 0.0:
        keep = dropout_keep_mask(int(rng_seed.item()), B, H, L, S, dropout_p, device=q.device)
        factor = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
        probs = probs * keep * factor
    out = torch.matmul(probs, v)
    return out.to(query.dtype), lse.detach()

