"""torchfast.nn.MultiheadAttention: nn.MultiheadAttention on the flash-attention kernels."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchfast.nn.functional import additive_mask, scaled_dot_product_attention
from torchfast.nn.layers import current_weight

__all__ = ["MultiheadAttention"]


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """F.linear of an (L, N, E) input; one that is the transposed view of a contiguous (N, L, E)
    tensor (batch_first callers, a feature map read as a sequence) is projected in that layout and
    returned as a view, instead of being copied into the GEMM's row-major layout and back."""
    if x.dim() == 3 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous():
        return F.linear(x.transpose(0, 1), weight, bias).transpose(0, 1)
    return F.linear(x, weight, bias)


class MultiheadAttention(nn.MultiheadAttention):
    """A drop-in for torch.nn.MultiheadAttention: same constructor, parameters (in_proj_weight,
    in_proj_bias, q/k/v_proj_weight when kdim/vdim differ, bias_k/bias_v, out_proj), state_dict,
    forward signature and outputs.

    With need_weights=False the attention runs on torchfast's flash kernel and never builds the
    (L, S) weights. need_weights=True (nn.MultiheadAttention's default) must return those weights,
    so it takes nn.MultiheadAttention's own materialising path: pass need_weights=False for speed.
    Differences on the fast path: rows whose every key is masked give 0 where torch gives NaN, and
    dropout draws a different (equally distributed) mask, reproducible under torch.manual_seed.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None) -> None:
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim ({embed_dim}) must be a positive multiple of "
                             f"num_heads ({num_heads})")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)

    # the attention itself: torchfast's flash kernels (a plain-PyTorch twin swaps in torch's)
    _sdpa = staticmethod(scaled_dot_product_attention)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if need_weights or any(t.is_nested for t in (query, key, value)):
            # the weights (L x S by definition), and nested tensors, take nn.MultiheadAttention's own path
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        batched = self._check_inputs(query, key, value)
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                if key_padding_mask.shape != (key.size(0),):
                    raise ValueError(f"MultiheadAttention: for unbatched input key_padding_mask must have shape "
                                     f"(S,) = {(key.size(0),)}, got {tuple(key_padding_mask.shape)}")
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out = self._attend(query, key, value, key_padding_mask, attn_mask, is_causal)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    # -- internals ------------------------------------------------------------------------------
    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> bool:
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError("MultiheadAttention: query, key and value must all be 3-D (batched) or 2-D "
                             f"(unbatched), got shapes {tuple(query.shape)}, {tuple(key.shape)}, "
                             f"{tuple(value.shape)}")
        batched = query.dim() == 3
        batch_dim = (0 if self.batch_first else 1) if batched else None
        if batched and not (query.size(batch_dim) == key.size(batch_dim) == value.size(batch_dim)):
            raise ValueError(f"MultiheadAttention: batch sizes differ (batch_first={self.batch_first}): query "
                             f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
        seq_dim = 1 if (batched and self.batch_first) else 0
        if key.size(seq_dim) != value.size(seq_dim):
            raise ValueError(f"MultiheadAttention: key and value lengths differ: key {tuple(key.shape)}, "
                             f"value {tuple(value.shape)}")
        for name, t, want in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.size(-1) != want:
                raise ValueError(f"MultiheadAttention: {name} has feature size {t.size(-1)}, expected {want} "
                                 f"(shape {tuple(t.shape)})")
        return batched

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if not self._qkv_same_embed_dim:
            return (_linear(query, self.q_proj_weight, bq), _linear(key, self.k_proj_weight, bk),
                    _linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        if query is key and key is value:  # self-attention: one GEMM for q, k and v
            return _linear(query, w, b).chunk(3, dim=-1)
        wq, wk, wv = w.split(E)
        return _linear(query, wq, bq), _linear(key, wk, bk), _linear(value, wv, bv)

    def _packed_self_attention_heads(self, query: Tensor, key: Tensor, value: Tensor):
        """q, k, v as (N, H, L, hd) views of one packed projection, for self-attention with the packed
        in_proj and no bias_k/bias_v/zero-attention (the common case), else None. The projection runs
        in whichever of the (L, N) / (N, L) orders the input is stored in, and the heads are taken with
        unbind: in the backward the three head gradients are stacked straight into the projection's
        layout (one pass), where chunk + reshape would copy them three times and once more for the GEMM."""
        if not (query is key and key is value and self._qkv_same_embed_dim and self.bias_k is None
                and not self.add_zero_attn and type(self)._project is MultiheadAttention._project):
            return None
        L, N, E = query.shape
        H = self.num_heads
        seq_major = query.is_contiguous() or not query.transpose(0, 1).is_contiguous()
        rows = query if seq_major else query.transpose(0, 1)  # (L, N, E) or (N, L, E), as stored
        y = F.linear(rows, self.in_proj_weight, self.in_proj_bias)
        q, k, v = y.view(*y.shape[:2], 3, H, E // H).unbind(2)
        order = (1, 2, 0, 3) if seq_major else (0, 2, 1, 3)
        return q.permute(*order), k.permute(*order), v.permute(*order)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                attn_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        """Attention over (L, N, E) inputs, returning (L, N, E)."""
        L, N, E = query.shape
        S, H = key.size(0), self.num_heads
        hd = E // H
        # nn.MultiheadAttention's convention: bool True = masked out, float = added to the scores.
        kpm = additive_mask(key_padding_mask, query.dtype, true_attends=False, name="key_padding_mask")
        mask = additive_mask(attn_mask, query.dtype, true_attends=False)
        if is_causal and mask is None:
            raise RuntimeError("MultiheadAttention: is_causal is a hint that attn_mask is the causal mask; "
                               "pass that mask too (as nn.MultiheadAttention requires)")
        if is_causal and kpm is None:
            mask = None  # trust the hint: the kernel's causal path needs no mask
        else:
            is_causal = False
        if kpm is not None and kpm.shape != (N, S):
            raise ValueError(f"MultiheadAttention: key_padding_mask must have shape (batch, S) = {(N, S)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if mask is not None:
            if mask.dim() == 2 and mask.shape == (L, S):
                mask = mask.view(1, 1, L, S)
            elif mask.dim() == 3 and mask.shape == (N * H, L, S):
                mask = mask.view(N, H, L, S)
            else:
                raise ValueError(f"MultiheadAttention: attn_mask must have shape (L, S) = {(L, S)} or "
                                 f"(batch * num_heads, L, S) = {(N * H, L, S)}, got {tuple(attn_mask.shape)}")
        def heads(t: Tensor) -> Tensor:  # (len, N, E) -> (N, H, len, hd), a view
            return t.view(t.size(0), N, H, hd).permute(1, 2, 0, 3)

        packed = self._packed_self_attention_heads(query, key, value)
        if packed is not None:
            q, k, v = packed
        else:
            q, k, v = self._project(query, key, value)
            if self.bias_k is not None and self.bias_v is not None:
                k = torch.cat([k, self.bias_k.expand(1, N, E)])
                v = torch.cat([v, self.bias_v.expand(1, N, E)])
                mask = None if mask is None else F.pad(mask, (0, 1))
                kpm = None if kpm is None else F.pad(kpm, (0, 1))
            q, k, v = heads(q), heads(k), heads(v)
        if self.add_zero_attn:
            zeros = k.new_zeros(N, H, 1, hd)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            mask = None if mask is None else F.pad(mask, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        if kpm is not None:
            kpm = kpm.view(N, 1, 1, kpm.size(-1))
            mask = kpm if mask is None else mask + kpm
        out = self._sdpa(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                         is_causal=is_causal)
        # (N, H, L, hd) -> (N, L, E): one copy; projected there and returned as an (L, N, E) view, so
        # that a caller that reads the result batch-first (or as a channels_last map) copies nothing
        out = out.transpose(1, 2).reshape(N, L, E)
        return self._output_projection(out).transpose(0, 1)

    def _output_projection(self, out: Tensor) -> Tensor:
        # current_weight: out_proj's weight as its own forward would see it (torch.nn.utils.prune
        # refreshes a pruned weight only when the module itself is called)
        return F.linear(out, current_weight(self.out_proj), self.out_proj.bias)
