"""torchfast.deploy.quantize: CPU int8 inference, by three well-kept toolchains.

- "onnx-static": ONNX export -> onnxruntime quant_pre_process -> quantize_static (QDQ, per-channel
  weights, calibrated on a loader); U8S8 or S8S8 activations/weights, whichever runs faster here;
- "dynamic": ONNX export -> onnxruntime quantize_dynamic of MatMul/Gemm only (Linear layers and the
  attention projections; its default would also turn Conv into ConvInteger, which runs slower than
  float convolutions on x86);
- "pt2e": torch.export -> torchao prepare_pt2e(X86InductorQuantizer) -> calibrate -> convert_pt2e
  -> torch.compile with frozen weights (inductor lowers the quantize/dequantize patterns to oneDNN's
  int8 kernels; an uncompiled PT2E graph only simulates int8 in float).

Every method first rewrites torchfast's fused layers to plain conv -> BN -> (add) -> ReLU with the
batch norms folded (deploy.plain.to_plain), so that nothing stays float because a quantizer could not
see into a fused op.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn

from torchfast.deploy import measure, runtime
from torchfast.deploy.onnx_export import export_onnx
from torchfast.deploy.plain import to_plain

METHODS = ("onnx-static", "dynamic", "pt2e")


@dataclass
class QuantizedModel:
    """The result: `module` runs it (tensors in, tensors out), `path` is its ONNX file (ONNX methods)."""
    module: nn.Module
    method: str
    path: Optional[str]
    size_bytes: int
    details: dict = field(default_factory=dict)

    def __call__(self, *inputs):
        return self.module(*inputs)


def _first_tensor(batch):
    if isinstance(batch, torch.Tensor):
        return (batch.cpu(),)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0].cpu(),)  # (inputs, targets) as a DataLoader over a labelled data set yields
    raise TypeError(f"quantize: calibration batches must be tensors or (inputs, targets) pairs, got "
                    f"{type(batch).__name__}")


def calibration_batches(calibration: Optional[Iterable], example_inputs, limit: int) -> list:
    """Up to `limit` input tuples from the loader (or the example inputs alone when there is none)."""
    if calibration is None:
        return [runtime.as_tuple(example_inputs)]
    batches = []
    for batch in calibration:
        batches.append(_first_tensor(batch))
        if len(batches) >= limit:
            break
    if not batches:
        raise ValueError("quantize: the calibration loader yielded no batches")
    return batches


def quantize(model: nn.Module, example_inputs, *, method: str = "onnx-static", calibration: Optional[Iterable] = None,
             path: Optional[str] = None, calibration_limit: int = 32, activation: str = "auto",
             threads: Optional[int] = None) -> QuantizedModel:
    """An int8 version of `model` (left unchanged) for CPU inference.

    example_inputs: a tensor or a tuple (batch dim first; the batch stays dynamic). calibration: an
    iterable of input batches or (inputs, targets) pairs (e.g. the validation DataLoader), used
    for the static methods' activation ranges (up to `calibration_limit` batches; without one, the
    example inputs calibrate, which is rarely representative). path: where the ONNX methods write
    their file (default: a temporary directory). activation (onnx-static): "u8" (U8S8), "s8"
    (S8S8) or "auto" (both quantized, the faster one here kept)."""
    if method not in METHODS:
        raise ValueError(f"quantize: method must be one of {METHODS}, got {method!r}")
    was_training = model.training
    model.eval()
    try:
        plain = to_plain(model, fold_bn=True).cpu()  # int8 inference here is the CPU's
    finally:
        model.train(was_training)
    example = tuple(t.cpu() for t in runtime.as_tuple(example_inputs))
    if method == "pt2e":
        return _pt2e(plain, example, calibration_batches(calibration, example, calibration_limit))
    workdir = os.path.dirname(os.path.abspath(path)) if path else tempfile.mkdtemp(prefix="torchfast-quant-")
    out_path = os.fspath(path) if path else os.path.join(workdir, f"model-{method}.onnx")
    fp32_path = os.path.splitext(out_path)[0] + "-fp32.onnx"
    export_onnx(plain, example, fp32_path, verify=False)
    if method == "dynamic":
        return _ort_dynamic(fp32_path, out_path, threads)
    return _ort_static(fp32_path, out_path, calibration_batches(calibration, example, calibration_limit), example,
                       activation, threads)


# -- onnxruntime -----------------------------------------------------------------------------------

def _ort_quantization():
    runtime.require_onnxruntime()
    from onnxruntime import quantization

    return quantization


def _pre_processed(fp32_path: str, out_path: str) -> str:
    """onnxruntime's quantization pre-processing (shape inference, graph optimisation)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre_path = os.path.splitext(out_path)[0] + "-pre.onnx"
    quant_pre_process(fp32_path, pre_path, skip_symbolic_shape=False)
    return pre_path


def _strip_metadata(path: str) -> None:
    """Drops the per-node debugging metadata (source locations, stack traces: ~15% of a small
    quantized file) from a deployment file; the graph is unchanged."""
    onnx = runtime.require_onnx()
    model = onnx.load(path)
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, path)


def _ort_dynamic(fp32_path: str, out_path: str, threads) -> QuantizedModel:
    q = _ort_quantization()
    q.quantize_dynamic(_pre_processed(fp32_path, out_path), out_path, op_types_to_quantize=["MatMul", "Gemm"], weight_type=q.QuantType.QInt8,
                       per_channel=True)
    _strip_metadata(out_path)
    return QuantizedModel(runtime.OrtModule(out_path, threads), "dynamic", out_path, runtime.file_bytes(out_path),
                          {"quantized": "MatMul/Gemm weights int8, activations quantized per call"})


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of input tuples."""

    def __init__(self, names, batches):
        self._items = iter([{n: runtime._to_numpy(t) for n, t in zip(names, b)} for b in batches])

    def get_next(self):
        return next(self._items, None)

    def rewind(self):  # pragma: no cover - some calibrators ask for it
        pass


def _ort_static(fp32_path, out_path, batches, example, activation, threads) -> QuantizedModel:
    q = _ort_quantization()
    if activation not in ("auto", "u8", "s8"):
        raise ValueError(f"quantize: activation must be 'auto', 'u8' or 's8', got {activation!r}")
    pre_path = _pre_processed(fp32_path, out_path)
    names = runtime.OrtModule(pre_path).input_names
    kinds = {"u8": q.QuantType.QUInt8, "s8": q.QuantType.QInt8}
    chosen = ["u8", "s8"] if activation == "auto" else [activation]
    candidates = {}
    for kind in chosen:
        target = out_path if len(chosen) == 1 else os.path.splitext(out_path)[0] + f"-{kind}s8.onnx"
        q.quantize_static(pre_path, target, _Reader(names, batches), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, activation_type=kinds[kind], weight_type=q.QuantType.QInt8,
                          calibrate_method=q.CalibrationMethod.MinMax)
        candidates[kind] = target
    timings = {}
    if len(candidates) > 1:
        timings = measure.latencies([measure.Variant(k, runtime.OrtModule(p, threads), 0)
                                     for k, p in candidates.items()], example, rounds=7, warmup=1)
        best = min(timings, key=timings.get)
        os.replace(candidates[best], out_path)
    else:
        best = chosen[0]
    _strip_metadata(out_path)
    details = {"format": f"QDQ {best.upper()}S8, per-channel weights", "calibration_batches": len(batches)}
    if timings:
        details["measured_ms"] = {f"{k.upper()}S8": round(v * 1e3, 3) for k, v in timings.items()}
    return QuantizedModel(runtime.OrtModule(out_path, threads), "onnx-static", out_path,
                          runtime.file_bytes(out_path), details)


# -- PT2E (torchao) --------------------------------------------------------------------------------

def _require_torchao():
    try:
        from torchao.quantization.pt2e import quantize_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except ImportError as e:
        raise ImportError("quantize(method='pt2e') needs torchao: pip install 'torchfast[deploy]'") from e
    return quantize_pt2e, x86_inductor_quantizer


class _FrozenCompiled(nn.Module):
    """torch.compile of a converted PT2E graph with inductor's weight freezing on (needed for the
    int8 lowering), applied at every call so that a new input shape recompiles the same way."""

    def __init__(self, graph_module: nn.Module):
        super().__init__()
        self.graph_module = graph_module
        # static shapes: the int8 convolution lowering fails under dynamic shapes in this torch, so
        # each new batch size compiles once (up to torch.compile's recompile limit)
        self.compiled = torch.compile(graph_module, dynamic=False)

    def forward(self, *inputs):
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True), warnings.catch_warnings():
            # inductor's int8 lowering copies a tensor the way torch itself warns about
            warnings.filterwarnings("ignore", message="To copy construct from a tensor")
            return self.compiled(*inputs)


def _graph_tensor_bytes(graph_module: torch.fx.GraphModule) -> int:
    """Bytes of the tensors the graph reads (its get_attr nodes): the int8 weights, their scales and
    the float biases; not the float weights convert_pt2e leaves behind, unused, on the module."""
    total = 0
    for target in {n.target for n in graph_module.graph.nodes if n.op == "get_attr"}:
        t = graph_module
        for part in target.split("."):
            t = getattr(t, part)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def _pt2e(plain: nn.Module, example: tuple, batches: list) -> QuantizedModel:
    quantize_pt2e, xiq = _require_torchao()
    dims = tuple({0: torch.export.Dim("batch")} for _ in example) if example[0].size(0) > 1 else None
    with torch.no_grad():
        graph = torch.export.export(plain.eval(), example, dynamic_shapes=dims).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for batch in batches:
            prepared(*batch)
    converted = quantize_pt2e.convert_pt2e(prepared)
    module = _FrozenCompiled(converted)
    module(*example)  # compile now, not at the caller's first timed call
    return QuantizedModel(module, "pt2e", None, _graph_tensor_bytes(converted),
                          {"format": "X86InductorQuantizer default (static, per-channel int8 weights)",
                           "calibration_batches": len(batches)})
