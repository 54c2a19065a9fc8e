"""Deployment benchmark: one model, its fp32 and int8 deployments side by side (latency at batch 1
and 32, interleaved rounds, medians; size; accuracy where the model was trained).

Models: the main job's network (ComplexNetwork trained on digits, 1x8x8), ComplexNetwork at 3x32x32,
and a compute-heavy stack (two ResidualBlock(256) at 32x32). Variants: torch eager fp32 of the plain
network (the baseline) and of torchfast's fused one, onnxruntime fp32 (torchfast.deploy.export_onnx),
and each torchfast.deploy.quantize method.
"""
from __future__ import annotations

import tempfile
import time
from typing import Optional

import torch
from torch import nn

import torchfast
from torchfast.deploy import measure, runtime
from torchfast.deploy.onnx_export import export_onnx
from torchfast.deploy.quantization import METHODS, quantize

MODELS = ("digits", "complexnet", "resblock256")


def _random_stats(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def build(name: str, workdir: str, log=print):
    """(model, input shape without batch, validation loader or None, calibration batches)."""
    if name == "digits":
        from torchfast.deploy.from_run import load_run
        from torchfast.train.job import JobConfig, run

        start = time.perf_counter()
        run(JobConfig(out=f"{workdir}/digits-run", progress=False), log=lambda *_: None)
        log(f"(trained the main job's network on digits in {time.perf_counter() - start:.0f} s)")
        trained = load_run(f"{workdir}/digits-run")
        loader = torch.utils.data.DataLoader(trained.val_set, batch_size=64)
        return trained.model, (1, 8, 8), loader, loader
    torch.manual_seed(0)
    if name == "complexnet":
        model, shape = torchfast.models.ComplexNetwork(10, 3), (3, 32, 32)
    elif name == "resblock256":
        model, shape = nn.Sequential(torchfast.nn.ResidualBlock(256), torchfast.nn.ResidualBlock(256)), (256, 32, 32)
    else:
        raise ValueError(f"unknown model {name!r}; one of {MODELS}")
    calibration = [(torch.randn(16, *shape),) for _ in range(4)]
    return _random_stats(model), shape, None, calibration


def plain_twin(name: str, model: nn.Module) -> nn.Module:
    """The same network as users write it in plain torch (the cheat sheet's modules), same weights."""
    from torchfast.reference import modules as plain

    if name == "resblock256":
        twin = nn.Sequential(plain.ResidualBlock(256), plain.ResidualBlock(256))
    else:
        first = model.features[0]
        twin = plain.ComplexNetwork(model.classifier[-1].out_features, first.in_channels)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def deploy_report(models=MODELS, methods=METHODS, batches=(1, 32), rounds: int = 15, log=print,
                  workdir: Optional[str] = None) -> dict:
    """{model: rows} (see measure.compare; the first row, the plain-torch network in eager mode, is the
    baseline; torchfast's eager model is the second)."""
    workdir = workdir or tempfile.mkdtemp(prefix="torchfast-bench-deploy-")
    report = {}
    for name in models:
        model, shape, loader, calibration = build(name, workdir, log)
        example = torch.randn(2, *shape)
        twin = plain_twin(name, model)
        variants = [measure.Variant("plain torch eager fp32", twin, measure.model_bytes(twin)),
                    measure.Variant("torchfast eager fp32", model, measure.model_bytes(model))]
        fp32 = export_onnx(model, example, f"{workdir}/{name}-fp32.onnx")
        variants.append(measure.Variant("onnxruntime fp32", runtime.OrtModule(fp32.path), fp32.file_bytes))
        for method in methods:
            path = None if method == "pt2e" else f"{workdir}/{name}-{method}.onnx"
            start = time.perf_counter()
            q = quantize(model, example, method=method, calibration=calibration, path=path)
            label = {"onnx-static": "ORT static int8", "dynamic": "ORT dynamic int8", "pt2e": "PT2E int8 (inductor)"}
            fmt = q.details.get("format", "")
            log(f"({name}: {method} in {time.perf_counter() - start:.0f} s{', ' + fmt if fmt else ''})")
            variants.append(measure.Variant(label[method], q.module, q.size_bytes))
        inputs = {b: (torch.randn(b, *shape),) for b in batches}
        report[name] = measure.compare(variants, inputs, loader, rounds=rounds)
    return report


TITLES = {
    "digits": "ComplexNetwork trained by `torchfast train` (digits, 1x8x8); accuracy on the validation split",
    "complexnet": "ComplexNetwork, 3x32x32 (random weights)",
    "resblock256": "two ResidualBlock(256), 256x32x32 (random weights)",
}


def format_report(report: dict) -> str:
    return "\n\n".join(measure.format_table(rows, TITLES.get(name, name)) for name, rows in report.items())


def plot_rows(report: dict) -> list:
    """(label, x, band, baseline) per model, variant and batch size, for the report's plot."""
    out = []
    for name, rows in report.items():
        batches = [k[3:] for k in rows[0] if k.startswith("ms@")]
        for r in rows[1:]:
            for b in batches:
                out.append((f"{name}, batch {b}: {r['variant']}", r[f"x@{b}"], r.get(f"band@{b}"),
                            "plain torch eager fp32"))
    return out
