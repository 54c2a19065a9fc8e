"""Optimizer step suite: the parameter sets (cases) and optimizers, shared by `torchfast bench --suites
optim` and benchmarks/bench_optim.py (and the clipping and sharded suites' parameters).

Optimizer steps are timed as torchfast vs torch.optim's default (foreach) vs torch.optim
fused=True on the same parameters, interleaved round by round so that machine noise hits every
implementation alike; the report gives medians, ratios within the run and effective GB/s.
"""
from __future__ import annotations

from typing import Callable

import torch

import torchfast
from torchfast.bench.timing import interleaved_medians

# Bytes moved per parameter per step: Adam reads p, g, m, v and writes p, m, v (7 x 4 B);
# SGD with momentum reads p, g, buf and writes p, buf (5 x 4 B).
BYTES_PER_PARAM = {"adam": 28, "adamw": 28, "sgd_momentum": 20}
IMPLS = ("torch-foreach", "torch-fused", "torchfast")


def resnet18_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of torchvision's resnet18 (62 tensors, 11,689,512 parameters)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    for cin, cout, stride in [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]:
        for block in range(2):
            ci = cin if block == 0 else cout
            shapes += [(cout, ci, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and (stride != 1 or cin != cout):
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
    return shapes + [(1000, 512), (1000,)]


CASES: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "resnet18": resnet18_shapes,
    "2000x4096": lambda: [(4096,)] * 2000,
}


def make_params(case: str, device="cpu", dtype=torch.float32, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in CASES[case]():
        p = torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_()
        p.grad = torch.randn(shape, generator=g).to(device=device, dtype=dtype) * 1e-3
        params.append(p)
    return params


def make_optimizer(kind: str, impl: str, params) -> torch.optim.Optimizer:
    lib = torchfast.optim if impl == "torchfast" else torch.optim
    extra = {"torch-foreach": {"foreach": True}, "torch-fused": {"fused": True}, "torchfast": {}}[impl]
    if kind == "adam":
        return lib.Adam(params, lr=1e-4, **extra)
    if kind == "adamw":
        return lib.AdamW(params, lr=1e-4, **extra)
    if kind == "sgd_momentum":
        return lib.SGD(params, lr=1e-4, momentum=0.9, **extra)
    raise ValueError(f"unknown optimizer kind {kind!r}; choose from {list(BYTES_PER_PARAM)}")


def optimizer_report(device="cpu", rounds=20, warmup=3, cases=tuple(CASES), kinds=tuple(BYTES_PER_PARAM)):
    """One row per (kind, case, impl): median ms, GB/s, and ratio to torch fused=True / foreach (with the
    25-75% band of the per-round ratio to foreach)."""
    rows = []
    for case in cases:
        params = make_params(case, device)
        numel = sum(p.numel() for p in params)
        for kind in kinds:
            opts = {impl: make_optimizer(kind, impl, params) for impl in IMPLS}
            med = interleaved_medians({impl: opt.step for impl, opt in opts.items()}, device, rounds, warmup)
            for impl in IMPLS:
                rows.append({
                    "optimizer": kind, "case": case, "tensors": len(params), "params": numel, "impl": impl,
                    "median_ms": med[impl] * 1e3,
                    "GB/s": numel * BYTES_PER_PARAM[kind] / med[impl] / 1e9,
                    "vs_fused": med[impl] / med["torch-fused"],
                    "vs_foreach": med[impl] / med["torch-foreach"],
                    "band": med.band(impl, "torch-foreach"),
                })
            del opts
    return rows


def format_table(rows) -> str:
    lines = ["| optimizer | case | impl | median ms | GB/s | vs torch fused | vs torch foreach |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['case']} ({r['tensors']} tensors) | {r['impl']} | "
                     f"{r['median_ms']:.2f} | {r['GB/s']:.1f} | {r['vs_fused']:.2f} | {r['vs_foreach']:.2f} |")
    return "\n".join(lines)
