"""ONNX translations of the torchfast ops for torch.onnx.export(dynamo=True): onnxscript functions
for its `custom_translation_table`, traced by the exporter (standard-domain nodes only; every size is
read from the graph's shapes, so a dynamic batch stays dynamic).

- torchfast::bn_add_relu -> BatchNormalization (+ Add) (+ Relu) with running statistics (the
  exporter's optimiser then folds it into a preceding Conv), or the batch statistics' ReduceMean
  arithmetic in training mode;
- torchfast::flash_attention -> the opset-23 `Attention` node when the export's opset allows it,
  else MatMul / Softmax / MatMul; the causal pattern and the mask are built from the graph's shapes.
"""
from __future__ import annotations

import torch

from torchfast.deploy import onnx_common

ATTENTION_MIN_OPSET = 23  # the first opset with a fused Attention operator


def _opset(version: int):
    import onnxscript

    return getattr(onnxscript, f"opset{min(version, onnx_common.MAX_OPSET)}")


def _bn_add_relu(op):
    def bn_add_relu(input, weight, bias, residual, running_mean, running_var, training: bool, eps: float,
                    relu: bool):
        channels = op.Shape(input, start=1, end=2)
        if weight is None:
            weight = op.Expand(op.CastLike(op.Constant(value_float=1.0), input), channels)
        if bias is None:
            bias = op.Expand(op.CastLike(op.Constant(value_float=0.0), input), channels)
        eps_t = op.CastLike(op.Constant(value_float=float(eps)), input)
        if training or running_mean is None or running_var is None:
            # batch statistics over every dim but the channels (N, *spatial)
            rank = op.Size(op.Shape(input))
            axes = op.Concat(op.Constant(value_ints=[0]), op.Range(op.Constant(value_int=2), rank,
                                                                     op.Constant(value_int=1)), axis=0)
            mean_kept = op.ReduceMean(input, axes, keepdims=1)
            centred = op.Sub(input, mean_kept)
            var_kept = op.ReduceMean(op.Mul(centred, centred), axes, keepdims=1)
            invstd_kept = op.Reciprocal(op.Sqrt(op.Add(var_kept, eps_t)))
            channel_view = op.Shape(mean_kept)
            y = op.Add(op.Mul(op.Mul(centred, invstd_kept), op.Reshape(weight, channel_view)),
                       op.Reshape(bias, channel_view))
            flat = op.Constant(value_ints=[-1])
            mean, var, invstd = op.Reshape(mean_kept, flat), op.Reshape(var_kept, flat), op.Reshape(invstd_kept, flat)
        else:
            y = op.BatchNormalization(input, weight, bias, running_mean, running_var, epsilon=float(eps))
            mean, var = op.Identity(running_mean), op.Identity(running_var)  # new values, not the inputs
            invstd = op.Reciprocal(op.Sqrt(op.Add(var, op.CastLike(op.Constant(value_float=float(eps)), var))))
        if residual is not None:
            y = op.Add(y, residual)
        if relu:
            y = op.Relu(y)
        return y, mean, invstd, var

    return bn_add_relu


def _flash_attention(op, opset: int):
    def flash_attention(query, key, value, attn_mask, is_causal: bool, scale: float, dropout_p: float, rng_seed):
        if dropout_p > 0.0:
            raise onnx_common.TranslationError(
                f"torchfast::flash_attention with dropout_p={dropout_p} has no ONNX translation: export the "
                "model in eval mode (dropout is off at inference)")
        neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), query)
        mask = attn_mask
        if is_causal:  # key j > query i is masked (top-left aligned, as the kernels)
            zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
            rows = op.Range(zero, op.Squeeze(op.Shape(query, start=2, end=3)), one)
            cols = op.Range(zero, op.Squeeze(op.Shape(key, start=2, end=3)), one)
            visible = op.LessOrEqual(op.Unsqueeze(cols, op.Constant(value_ints=[0])),
                                     op.Unsqueeze(rows, op.Constant(value_ints=[1])))
            causal = op.Where(visible, op.CastLike(op.Constant(value_float=0.0), query), neg_inf)
            mask = causal if mask is None else op.Add(mask, causal)
        scores = op.Mul(op.MatMul(query, op.Transpose(key, perm=[0, 1, 3, 2])),
                        op.CastLike(op.Constant(value_float=float(scale)), query))
        if mask is not None:
            scores = op.Add(scores, mask)
        # logsumexp per query row (-inf for a fully masked row); unused in inference graphs, where
        # the exporter's optimiser drops it
        lse = op.ReduceLogSumExp(scores, op.Constant(value_ints=[-1]), keepdims=0)
        if opset >= ATTENTION_MIN_OPSET:
            if mask is not None:
                # onnxruntime's Attention wants the mask's query dim spelled out (no broadcast over L)
                rows_by_keys = op.Concat(op.Shape(query, start=2, end=3), op.Shape(key, start=2, end=3), axis=0)
                full_mask = op.Add(mask, op.Expand(op.CastLike(op.Constant(value_float=0.0), mask), rows_by_keys))
                fused = op.Attention(query, key, value, full_mask, scale=float(scale))
            else:
                fused = op.Attention(query, key, value, scale=float(scale))
            out = fused[0] if isinstance(fused, (tuple, list)) else fused  # Y (the cache outputs unused)
        else:
            out = op.MatMul(op.Softmax(scores, axis=-1), value)
        if mask is not None:
            # a row whose every key is masked gives 0 (as the kernels), not softmax's NaN; read off the
            # mask alone, so that the Attention path builds no (L, S) scores
            dead = op.Equal(op.ReduceMax(mask, op.Constant(value_ints=[-1]), keepdims=1), neg_inf)
            out = op.Where(dead, op.CastLike(op.Constant(value_float=0.0), out), out)
        return out, lse

    return flash_attention


def translation_table(opset: int = onnx_common.DEFAULT_OPSET) -> dict:
    """{torch.ops.torchfast.<op>.default: onnxscript function} for torch.onnx.export's
    custom_translation_table at this opset (use it inside torchfast.deploy.keep_torchfast_ops())."""
    onnx_common.require_onnxscript()
    op = _opset(opset)
    table = {}
    for name, make in (("bn_add_relu", lambda: _bn_add_relu(op)),
                       ("flash_attention", lambda: _flash_attention(op, opset))):
        packet = onnx_common.torchfast_op(name)
        if packet is not None:
            table[packet.default] = make()
    return table
