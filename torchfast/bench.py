"""Benchmark cases and timing shared by `torchfast bench` and benchmarks/ (pytest-benchmark).

Optimizer steps are timed as torchfast vs torch.optim's default (foreach) vs torch.optim
fused=True on the same parameters, interleaved round by round so that machine noise hits every
implementation alike; the report gives medians, ratios within the run and effective GB/s.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

import torchfast
from torchfast.reference import modules as plain

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


def timed_step(opt: torch.optim.Optimizer, device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    opt.step()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def optimizer_report(device="cpu", rounds=20, warmup=3, cases=tuple(CASES), kinds=tuple(BYTES_PER_PARAM)):
    """One row per (kind, case, impl): median ms, GB/s, and ratio to torch fused=True / foreach."""
    rows = []
    for case in cases:
        params = make_params(case, device)
        numel = sum(p.numel() for p in params)
        for kind in kinds:
            opts = {impl: make_optimizer(kind, impl, params) for impl in IMPLS}
            times = {impl: [] for impl in IMPLS}
            for r in range(warmup + rounds):
                for impl, opt in opts.items():  # interleaved: noise hits all alike
                    t = timed_step(opt, device)
                    if r >= warmup:
                        times[impl].append(t)
            med = {impl: statistics.median(ts) for impl, ts in times.items()}
            for impl in IMPLS:
                rows.append({
                    "optimizer": kind, "case": case, "tensors": len(params), "params": numel, "impl": impl,
                    "median_ms": med[impl] * 1e3,
                    "GB/s": numel * BYTES_PER_PARAM[kind] / med[impl] / 1e9,
                    "vs_fused": med[impl] / med["torch-fused"],
                    "vs_foreach": med[impl] / med["torch-foreach"],
                })
            del opts
    return rows


def _interleaved_medians(fns: dict, device, rounds: int, warmup: int, before: Callable = None) -> dict:
    """Median seconds of each callable, timed round by round in turn (noise hits all alike);
    `before()` runs ahead of each call, untimed (a barrier, for ranks that must start together)."""
    cuda = torch.device(device).type == "cuda"
    times = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            if before is not None:
                before()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def clip_report(device="cpu", rounds=20, warmup=3, case="resnet18"):
    """clip_grad_norm_ (torch foreach vs torchfast), when it does not clip and when every call clips,
    and torch clip_grad_norm_ + Adam(fused=True) vs torchfast Adam(max_grad_norm)."""
    params = make_params(case, device)
    numel = sum(p.numel() for p in params)
    norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
    # "clips": every call clips by 0.9 (the norm the grads will have is tracked, so that each call
    # asks for 0.9 of it); 0.9**60 keeps the grads far from denormals over a run.
    tracked = {"norm": norm}

    def clipping(fn):
        def call():
            tracked["norm"] *= 0.9
            fn(params, tracked["norm"])
        return call

    rows = []
    for label in ("no clipping", "clips"):
        if label == "no clipping":
            fns = {"torch": lambda: torch.nn.utils.clip_grad_norm_(params, 1e6 * norm, foreach=True),
                   "torchfast": lambda: torchfast.nn.utils.clip_grad_norm_(params, 1e6 * norm)}
        else:
            fns = {"torch": clipping(lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=True)),
                   "torchfast": clipping(torchfast.nn.utils.clip_grad_norm_)}
        med = _interleaved_medians(fns, device, rounds, warmup)
        # bytes: one read of the grads, plus a read and a write when it clips
        nbytes = numel * 4 * (3 if label == "clips" else 1)
        for impl in ("torch", "torchfast"):
            rows.append({"bench": f"clip_grad_norm_ ({label})", "case": case, "impl": impl,
                         "median_ms": med[impl] * 1e3, "GB/s": nbytes / med[impl] / 1e9,
                         "ratio": med[impl] / med["torch"]})
    clip_always = 0.5 * tracked["norm"]  # below the grads' norm: both clip on every step
    fused = torch.optim.Adam(params, lr=1e-4, fused=True)
    ours = torchfast.optim.Adam(params, lr=1e-4, max_grad_norm=clip_always)

    def torch_clip_adam():
        torch.nn.utils.clip_grad_norm_(params, clip_always, foreach=True)
        fused.step()

    med = _interleaved_medians({"torch": torch_clip_adam, "torchfast": ours.step}, device, rounds, warmup)
    for impl, label in (("torch", "clip_grad_norm_ + Adam(fused=True)"), ("torchfast", "Adam(max_grad_norm)")):
        rows.append({"bench": "clipped Adam step", "case": case, "impl": label, "median_ms": med[impl] * 1e3,
                     "GB/s": numel * 32 / med[impl] / 1e9, "ratio": med[impl] / med["torch"]})
    return rows


def format_clip_table(rows) -> str:
    lines = ["| benchmark | case | impl | median ms | GB/s | vs torch |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['bench']} | {r['case']} | {r['impl']} | {r['median_ms']:.2f} | {r['GB/s']:.1f} | "
                     f"{r['ratio']:.2f} |")
    return "\n".join(lines)


def norm_report(device="cpu", rounds=10, warmup=2, batch=32, channels=64, size=32, dtype=torch.float32,
                with_compile=True):
    """BN + add + ReLU forward+backward (fused vs eager; contiguous and channels_last), and the
    ResidualBlock train step and inference against the cheat sheet's block (eager, channels_last,
    and torch.compile unless with_compile=False). Inputs and modules in `dtype`."""
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    residual = torch.randn_like(x)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    rows = []

    bn = torch.nn.BatchNorm2d(channels).to(device, dtype)
    fused_bn = torchfast.nn.BatchNormAddReLU2d(channels).to(device, dtype)

    def bn_step(module, inp, res, fused):
        def run():
            xi, ri = inp.detach().requires_grad_(), res.detach().requires_grad_()
            out = module(xi, ri) if fused else torch.relu(module(xi) + ri)
            out.backward(torch.ones_like(out))
        return run

    # bytes: forward reads x twice (stats) + x, r and writes out; backward reads g, out, x twice and
    # writes dx, dr: 11 tensor passes
    nbytes = 11 * x.numel() * x.element_size()
    residual_cl = residual.contiguous(memory_format=torch.channels_last)
    for label, inp, res in (("", x, residual), (", channels_last", x_cl, residual_cl)):
        med = _interleaved_medians({"eager": bn_step(bn, inp, res, False), "torchfast": bn_step(fused_bn, inp, res, True)},
                                   device, rounds, warmup)
        for impl in ("eager", "torchfast"):
            rows.append({"bench": f"BN+add+ReLU fwd+bwd{label}", "impl": impl, "median_ms": med[impl] * 1e3,
                         "GB/s": nbytes / med[impl] / 1e9, "ratio": med[impl] / med["eager"]})

    seed = plain.ResidualBlock(channels).to(device, dtype)
    ours = torchfast.nn.ResidualBlock(channels).to(device, dtype)
    ours.load_state_dict(seed.state_dict())
    seed_cl = plain.ResidualBlock(channels).to(device, dtype).to(memory_format=torch.channels_last)
    seed_cl.load_state_dict(seed.state_dict())
    compiled_block = plain.ResidualBlock(channels).to(device, dtype)
    compiled_block.load_state_dict(seed.state_dict())
    compiled = torch.compile(compiled_block)

    def train_step(module, inp):
        def run():
            xi = inp.detach().requires_grad_()
            module(xi).sum().backward()
        return run

    fns = {"seed block (eager)": train_step(seed, x), "torchfast ResidualBlock": train_step(ours, x),
           "seed block, channels_last": train_step(seed_cl, x_cl),
           "torchfast ResidualBlock, channels_last in": train_step(ours, x_cl)}
    if with_compile:
        fns["seed block, torch.compile"] = train_step(compiled, x)
    med = _interleaved_medians(fns, device, rounds, warmup)
    for impl, t in med.items():
        rows.append({"bench": "ResidualBlock train step", "impl": impl, "median_ms": t * 1e3, "GB/s": float("nan"),
                     "ratio": t / med["seed block (eager)"]})

    for m in (seed, ours, seed_cl, compiled_block):
        m.eval()
    with torch.no_grad():
        fns = {"seed block (eager)": lambda: seed(x), "torchfast ResidualBlock": lambda: ours(x),
               "seed block, channels_last": lambda: seed_cl(x_cl),
               "torchfast ResidualBlock, channels_last in": lambda: ours(x_cl)}
        med = _interleaved_medians(fns, device, rounds, warmup)
    for impl, t in med.items():
        rows.append({"bench": "ResidualBlock inference", "impl": impl, "median_ms": t * 1e3, "GB/s": float("nan"),
                     "ratio": t / med["seed block (eager)"]})
    return rows


def format_norm_table(rows) -> str:
    lines = ["| benchmark | impl | median ms | GB/s | vs eager |", "|---|---|---:|---:|---:|"]
    for r in rows:
        gbs = "" if r["GB/s"] != r["GB/s"] else f"{r['GB/s']:.1f}"
        lines.append(f"| {r['bench']} | {r['impl']} | {r['median_ms']:.2f} | {gbs} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def format_table(rows) -> str:
    lines = ["| optimizer | case | impl | median ms | GB/s | vs torch fused | vs torch foreach |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['case']} ({r['tensors']} tensors) | {r['impl']} | "
                     f"{r['median_ms']:.2f} | {r['GB/s']:.1f} | {r['vs_fused']:.2f} | {r['vs_foreach']:.2f} |")
    return "\n".join(lines)
