"""Python face of the flash-attention ops (csrc/attention): fake and autograd registrations, and the
function that runs the kernel or, where no kernel serves the call, the reference."""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from torchfast import _loader
from torchfast.ops._registry import (autograd_transforms_active, compiled_op, lower_to_reference, grads_through,
                                      register_fake_if_compiled)
from torchfast.reference import attention as ref

# The CUDA kernels keep a row's head dim in registers and a key tile in shared memory: head dims above
# these use the reference there (fp64 tiles take twice the shared memory).
CUDA_MAX_HEAD_DIM = 256
CUDA_MAX_HEAD_DIM_FP64 = 128


def cuda_scalar_kernel_shared_memory(dtype: torch.dtype, head_dim: int, value_dim: int) -> tuple[int, int]:
    """Bytes of shared memory per block of the scalar CUDA forward and backward kernels
    (csrc/attention/attention_cuda.cu: 16 query rows and 32-key tiles, 4 warps), in their compute
    type. A GPU whose opt-in limit is smaller (e.g. 64 KiB on sm_75 for an fp32 backward at D=128)
    runs such calls on the reference."""
    acc = 8 if dtype == torch.float64 else 4
    rows, keys, warps = 16, 32, 4
    forward = acc * (rows * head_dim + keys * (head_dim + 1) + keys * value_dim)
    backward = acc * (2 * keys * (head_dim + 1) + 2 * keys * (value_dim + 1) + warps * (head_dim + value_dim))
    return forward, backward


@functools.lru_cache(maxsize=None)
def _cuda_shared_memory_optin(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@register_fake_if_compiled("flash_attention")
def _flash_attention_fake(query, key, value, attn_mask, is_causal, scale, dropout_p, rng_seed):
    B, H, L, _ = query.shape
    out = query.new_empty((B, H, L, value.size(-1)))
    return out, query.new_empty((B, H, L), dtype=_lse_dtype(query))


@register_fake_if_compiled("flash_attention_backward")
def _flash_attention_backward_fake(grad_out, query, key, value, out, logsumexp, attn_mask, is_causal, scale,
                                   dropout_p, rng_seed):
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape))


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, is_causal, scale, dropout_p, rng_seed = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, attn_mask, rng_seed)
    ctx.is_causal, ctx.scale, ctx.dropout_p = is_causal, scale, dropout_p
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    query, key, value, out, lse, attn_mask, rng_seed = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True (double backward): the kernel's backward is not differentiable, so the
        # gradient is taken through the reference, which builds a graph of its own.
        ref_out, _ = ref.flash_attention(query, key, value, attn_mask, ctx.is_causal, ctx.scale, ctx.dropout_p,
                                         rng_seed)
        return (*grads_through(ref_out, (query, key, value), ctx.needs_input_grad[:3], grad_out),
                None, None, None, None, None)
    gq, gk, gv = torch.ops.torchfast.flash_attention_backward(
        grad_out.contiguous(), query, key, value, out, lse, attn_mask, ctx.is_causal, ctx.scale, ctx.dropout_p,
        rng_seed)
    return gq, gk, gv, None, None, None, None, None


if _loader.STATE.loaded:
    try:
        torch.library.register_autograd("torchfast::flash_attention", _backward, setup_context=_setup_context)
    except (RuntimeError, AttributeError):  # schema absent in a partial build
        pass


def kernel_serves(query: Tensor, value: Tensor, attn_mask: Optional[Tensor]) -> bool:
    """Whether the compiled kernel handles this call (else the reference does)."""
    device = query.device.type
    if lower_to_reference() or autograd_transforms_active():
        return False  # exporters and torch.func transforms get the reference's plain ops
    if not (_loader.has_kernel("flash_attention", device) and _loader.has_kernel("flash_attention_backward", device)):
        return False
    if attn_mask is not None and attn_mask.requires_grad:
        return False  # the kernels give no mask gradient
    if device != "cuda":
        return True
    limit = CUDA_MAX_HEAD_DIM_FP64 if query.dtype == torch.float64 else CUDA_MAX_HEAD_DIM
    if max(query.size(-1), value.size(-1)) > limit:
        return False
    # the scalar kernels (the fallback of the tensor-core ones, too) must fit this GPU's shared memory
    need = max(cuda_scalar_kernel_shared_memory(query.dtype, query.size(-1), value.size(-1)))
    return need <= _cuda_shared_memory_optin(query.device.index if query.device.index is not None
                                             else torch.cuda.current_device())


def flash_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                    scale: float, dropout_p: float, rng_seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(out, logsumexp) for 4-D (B, H, L, D) operands and an additive float mask; see csrc/torchfast.cpp."""
    if kernel_serves(query, value, attn_mask):
        return compiled_op("flash_attention")(query, key, value, attn_mask, is_causal, float(scale),
                                              float(dropout_p), rng_seed)
    return ref.flash_attention(query, key, value, attn_mask, is_causal, float(scale), float(dropout_p), rng_seed)
