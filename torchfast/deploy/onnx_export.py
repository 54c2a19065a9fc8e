"""torchfast.deploy.export_onnx: ONNX export with the torchfast ops' translations, checked and verified."""
from __future__ import annotations

import collections
import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from torchfast.deploy import onnx_common, onnx_dynamo, onnx_legacy, runtime
from torchfast.ops._registry import onnx_translations_active

EXPORTERS = ("dynamo", "legacy")
STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass
class ExportReport:
    path: str
    exporter: str
    opset: int
    nodes: dict  # op type -> count
    domains: list
    file_bytes: int
    max_error: Optional[float] = None  # max |ort - torch| / max(1, max |torch|) over the verified batches
    verified_batches: list = field(default_factory=list)

    def __str__(self) -> str:
        top = ", ".join(f"{k} {v}" for k, v in sorted(self.nodes.items(), key=lambda kv: -kv[1])[:8])
        err = "not verified" if self.max_error is None else \
            f"max error {self.max_error:.2e} vs torch at batch {', '.join(map(str, self.verified_batches))}"
        return (f"{self.path}: {self.exporter} exporter, opset {self.opset}, {sum(self.nodes.values())} nodes "
                f"({top}), {self.file_bytes / 1e6:.2f} MB, {err}")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _prepared_inputs(example_inputs, dynamic_batch: bool) -> tuple:
    inputs = runtime.as_tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in inputs):
        raise TypeError("export_onnx: example_inputs must be a tensor or a tuple of tensors with a batch dim, got "
                        f"{[type(t).__name__ if not isinstance(t, torch.Tensor) else tuple(t.shape) for t in inputs]}")
    if dynamic_batch and inputs[0].size(0) == 1:
        # torch.export specialises sizes 0 and 1: trace at batch 2 so that the batch stays symbolic
        inputs = runtime.batch_like(inputs, 2)
    return inputs


def _export_dynamo(model, inputs, path, opset, dynamic_batch):
    onnx_common.require_onnxscript()
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    with onnx_translations_active(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Dim|dynamic|specialize|axis name).*")
        program = torch.onnx.export(model, inputs, path, dynamo=True, opset_version=opset,
                                    dynamic_shapes=dynamic_shapes, external_data=False,
                                    custom_translation_table=onnx_dynamo.translation_table(opset), verbose=False,
                                    report=False)
    return program


def _export_legacy(model, inputs, path, opset, dynamic_batch):
    if opset > onnx_common.LEGACY_MAX_OPSET:
        raise ValueError(f"export_onnx: the legacy (TorchScript) exporter stops at opset "
                         f"{onnx_common.LEGACY_MAX_OPSET}, got opset={opset}; use exporter='dynamo'")
    onnx_legacy.register()
    names = [f"input_{i}" for i in range(len(inputs))]
    with torch.no_grad():
        n_out = len(runtime.flat_outputs(model(*inputs)))
    outputs = [f"output_{i}" for i in range(n_out)]
    # This exporter's own spelling of a dynamic batch (it predates torch.export.Dim).
    axes = {name: {0: "batch"} for name in names + outputs} if dynamic_batch else None
    with onnx_translations_active(), warnings.catch_warnings():
        # the deprecation notice, and the tracer's notes on shapes read as Python numbers (the
        # batch among them is marked dynamic above)
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, torch.jit.TracerWarning))
        torch.onnx.export(model, inputs, path, dynamo=False, opset_version=opset, input_names=names,
                          output_names=outputs, dynamic_axes=axes)


def export_onnx(model: nn.Module, example_inputs, path: str, *, opset: Optional[int] = None,
                dynamic_batch: bool = True, exporter: str = "dynamo", verify: bool = True,
                verify_batches: tuple = (1, 7), tolerance: float = 1e-4) -> ExportReport:
    """Exports `model` (in eval mode; its modes are restored afterwards) to `path` with the torchfast
    ops translated to standard ONNX (BatchNormalization/Add/Relu; Attention at opset >= 23, else
    MatMul/Softmax/MatMul), checks it with onnx.checker and, with `verify`, runs it in onnxruntime at
    `verify_batches` (dynamic batch) or the example's batch against torch, raising if the error
    passes `tolerance` (relative to max(1, |output|)). Returns an ExportReport."""
    onnx = runtime.require_onnx()
    if exporter not in EXPORTERS:
        raise ValueError(f"export_onnx: exporter must be one of {EXPORTERS}, got {exporter!r}")
    opset = onnx_common.DEFAULT_OPSET if opset is None else int(opset)
    limit = onnx_common.MAX_OPSET if exporter == "dynamo" else onnx_common.LEGACY_MAX_OPSET
    if not 14 <= opset <= limit:
        raise ValueError(f"export_onnx: opset must be in [14, {limit}] for the {exporter} exporter, got {opset}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    inputs = _prepared_inputs(example_inputs, dynamic_batch)
    with _eval_mode(model), _quiet_exporter_logs():
        if exporter == "dynamo":
            _export_dynamo(model, inputs, path, opset, dynamic_batch)
        else:
            _export_legacy(model, inputs, path, opset, dynamic_batch)
        onnx.checker.check_model(path)
        proto = onnx.load(path)
        report = ExportReport(path=path, exporter=exporter, opset=_model_opset(proto),
                              nodes=dict(collections.Counter(n.op_type for n in proto.graph.node)),
                              domains=sorted({n.domain for n in proto.graph.node}), file_bytes=runtime.file_bytes(path))
        if verify:
            batches = list(verify_batches) if dynamic_batch else [inputs[0].size(0)]
            report.max_error, report.verified_batches = verify_onnx(model, inputs, path, batches), batches
            if report.max_error > tolerance:
                raise AssertionError(f"export_onnx: onnxruntime differs from torch by {report.max_error:.3e} "
                                     f"(tolerance {tolerance:g}) on {path}")
    return report


def verify_onnx(model: nn.Module, example_inputs, path: str, batches) -> float:
    """Max over `batches` and outputs of |onnxruntime - torch| / max(1, max |torch|)."""
    session = runtime.OrtModule(path)
    worst = 0.0
    for b in batches:
        inputs = runtime.batch_like(runtime.as_tuple(example_inputs), b, seed=b)
        with torch.no_grad():
            expected = runtime.flat_outputs(model(*inputs))
        got = runtime.flat_outputs(session(*inputs))
        for e, g in zip(expected, got):
            e = e.detach().float().cpu()
            denom = max(1.0, e.abs().max().item()) if e.numel() else 1.0
            worst = max(worst, ((g.float() - e).abs().max().item() / denom) if e.numel() else 0.0)
    return worst


@contextlib.contextmanager
def _quiet_exporter_logs():
    """The dynamo exporter logs a warning per torchvision op it cannot register when torchvision is
    absent: noise for a model that uses none of them."""
    import logging

    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _model_opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS), 0)
