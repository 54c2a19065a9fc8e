"""ONNX symbolic functions of the torchfast ops for the TorchScript exporter
(torch.onnx.export(..., dynamo=False)), registered with torch.onnx.register_custom_op_symbolic.

The same translations as onnx_dynamo (BatchNormalization/Add/Relu; MatMul/Softmax/MatMul with the
mask and causal pattern; the TorchScript exporter stops at opset 20, below the Attention node), in
eval mode: that exporter traces in eval mode unless told otherwise.
"""
from __future__ import annotations

import warnings

import torch

from torchfast.deploy import onnx_common

LEGACY_MIN_OPSET = 14  # shapes read with Shape/Slice, reductions as the opset spells them
_REGISTERED = False


def _const(g, value, dtype=torch.float32):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _dim(g, x, index: int):
    """x.shape[index] as a 1-element int64 tensor (dynamic)."""
    return g.op("Slice", g.op("Shape", x), _const(g, [index], torch.int64), _const(g, [index + 1], torch.int64))


def _reduce(g, name: str, x, axes: list, keepdims: int):
    if g.opset >= 18:  # axes became an input
        return g.op(name, x, _const(g, axes, torch.int64), keepdims_i=keepdims)
    return g.op(name, x, axes_i=axes, keepdims_i=keepdims)


def _check_opset(g, op: str) -> None:
    if g.opset < LEGACY_MIN_OPSET:
        raise onnx_common.TranslationError(f"the ONNX translation of torchfast::{op} needs opset >= "
                                           f"{LEGACY_MIN_OPSET}, the export asked for {g.opset}")


def _bn_add_relu(g, input, weight, bias, residual, running_mean, running_var, training, eps, relu):
    from torch.onnx import symbolic_helper as sh

    _check_opset(g, "bn_add_relu")
    training, eps, relu = sh._maybe_get_const(training, "b"), sh._maybe_get_const(eps, "f"), \
        sh._maybe_get_const(relu, "b")
    if training or sh._is_none(running_mean) or sh._is_none(running_var):
        raise onnx_common.TranslationError(
            "torchfast::bn_add_relu in training mode (batch statistics) has no TorchScript-exporter translation: "
            "export in eval mode, or with dynamo=True (torchfast.deploy.export_onnx)")
    channels = _dim(g, input, 1)
    if sh._is_none(weight):
        weight = g.op("Expand", g.op("CastLike", _const(g, 1.0), input), channels)
    if sh._is_none(bias):
        bias = g.op("Expand", g.op("CastLike", _const(g, 0.0), input), channels)
    y = g.op("BatchNormalization", input, weight, bias, running_mean, running_var, epsilon_f=float(eps))
    if not sh._is_none(residual):
        y = g.op("Add", y, residual)
    if relu:
        y = g.op("Relu", y)
    invstd = g.op("Reciprocal", g.op("Sqrt", g.op("Add", running_var, g.op("CastLike", _const(g, float(eps)),
                                                                              running_var))))
    return y, running_mean, invstd, running_var


def _flash_attention(g, query, key, value, attn_mask, is_causal, scale, dropout_p, rng_seed):
    from torch.onnx import symbolic_helper as sh

    _check_opset(g, "flash_attention")
    is_causal, scale, dropout_p = sh._maybe_get_const(is_causal, "b"), sh._maybe_get_const(scale, "f"), \
        sh._maybe_get_const(dropout_p, "f")
    if dropout_p > 0.0:
        raise onnx_common.TranslationError(
            f"torchfast::flash_attention with dropout_p={dropout_p} has no ONNX translation: export in eval mode")
    neg_inf = g.op("CastLike", _const(g, float("-inf")), query)
    zero_f = g.op("CastLike", _const(g, 0.0), query)
    mask = None if sh._is_none(attn_mask) else attn_mask
    if is_causal:
        zero, one = _const(g, 0, torch.int64), _const(g, 1, torch.int64)
        squeeze = lambda t: g.op("Squeeze", t, _const(g, [0], torch.int64))
        rows = g.op("Range", zero, squeeze(_dim(g, query, 2)), one)
        cols = g.op("Range", zero, squeeze(_dim(g, key, 2)), one)
        visible = g.op("LessOrEqual", g.op("Unsqueeze", cols, _const(g, [0], torch.int64)),
                       g.op("Unsqueeze", rows, _const(g, [1], torch.int64)))
        causal = g.op("Where", visible, zero_f, neg_inf)
        mask = causal if mask is None else g.op("Add", mask, causal)
    scores = g.op("Mul", g.op("MatMul", query, g.op("Transpose", key, perm_i=[0, 1, 3, 2])),
                  g.op("CastLike", _const(g, float(scale)), query))
    if mask is not None:
        scores = g.op("Add", scores, mask)
    out = g.op("MatMul", g.op("Softmax", scores, axis_i=-1), value)
    if mask is not None:  # fully masked rows give 0, as the kernels
        dead = g.op("Equal", _reduce(g, "ReduceMax", mask, [-1], 1), neg_inf)
        out = g.op("Where", dead, zero_f, out)
    lse = _reduce(g, "ReduceLogSumExp", scores, [-1], 0)
    return out, lse


def register() -> None:
    """Registers the symbolic functions (once; the TorchScript exporter's registry is process-wide).
    torch warns that this exporter is deprecated: that warning is silenced here, not at export."""
    global _REGISTERED
    if _REGISTERED:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        for name, fn in (("bn_add_relu", _bn_add_relu), ("flash_attention", _flash_attention)):
            if onnx_common.torchfast_op(name) is not None:
                torch.onnx.register_custom_op_symbolic(f"torchfast::{name}", fn, LEGACY_MIN_OPSET)
    _REGISTERED = True
