"""Whole-model benchmark: the cheat sheet's ComplexNetwork in plain torch vs torchfast's, end to end
(inference, and a train step with AdamW), interleaved rounds, medians; the profile's top ops of each
torchfast measurement beside the table (layout copies and unfused ops show there first); and the
main job, `torchfast train` vs `torchfast train --eager`, as wall time of whole runs.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch
from torch import nn

import torchfast
from torchfast.bench.timing import Timings, interleaved_medians
from torchfast.reference import modules as plain


def profile_summary(fn: Callable, steps: int = 3, top: int = 8) -> tuple:
    """([(op, share of self CPU time, calls per step)] for the top ops while `fn` runs `steps` times,
    and the share of aten::copy_ (the layout copies), from one profile."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: -e.self_cpu_time_total)
    copy_share = sum(e.self_cpu_time_total for e in events if e.key == "aten::copy_") / total
    return [(e.key, e.self_cpu_time_total / total, e.count / steps) for e in events[:top]], copy_share


def _timed(fns: dict, rounds: int) -> Timings:
    return interleaved_medians(fns, "cpu", rounds, warmup=2)


def _pair(num_classes=10, in_channels=3, seed=0):
    torch.manual_seed(seed)
    fast = torchfast.models.ComplexNetwork(num_classes, in_channels)
    base = plain.ComplexNetwork(num_classes, in_channels)
    base.load_state_dict(fast.state_dict())
    return base, fast


def inference_report(batch: int = 32, size: int = 32, rounds: int = 20, with_onnx: bool = True) -> tuple:
    """(rows, profile of torchfast's inference) for eval() + no_grad."""
    base, fast = _pair()
    base.eval(), fast.eval()
    x = torch.randn(batch, 3, size, size)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    fns = {"plain eager": lambda: base(x), "plain eager, channels_last input": lambda: base(x_cl),
           "torchfast": lambda: fast(x)}
    if with_onnx:
        try:
            from torchfast.deploy import OrtModule, export_onnx

            path = os.path.join(tempfile.mkdtemp(prefix="torchfast-bench-models-"), "complexnet.onnx")
            ort = OrtModule(export_onnx(fast, x[:2], path).path)
            fns["onnxruntime fp32 (torchfast.deploy)"] = lambda: ort(x)
        except ImportError:
            pass
    with torch.no_grad():
        t = _timed(fns, rounds)
        prof, _ = profile_summary(lambda: fast(x))
    base_t = t["plain eager"]
    rows = [{"bench": f"inference, batch {batch}, 3x{size}x{size}", "impl": k, "median_ms": v * 1e3,
             "vs_plain": v / base_t, "band": t.band(k, "plain eager")} for k, v in t.items()]
    return rows, prof


def train_report(batch: int = 32, size: int = 32, rounds: int = 15, amp: bool = False) -> tuple:
    """(rows, profile of torchfast's step, its aten::copy_ share): forward + backward + AdamW."""
    base, fast = _pair()
    for m in (base, fast):
        m.train()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    opt_base = torch.optim.AdamW(base.parameters(), lr=1e-3, fused=True)
    opt_fast = torchfast.optim.AdamW(fast.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step(model, opt):
        def run():
            opt.zero_grad(set_to_none=True)
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
            with ctx:
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        return run

    fns = {"plain eager + AdamW(fused=True)": step(base, opt_base), "torchfast + torchfast AdamW": step(fast, opt_fast)}
    t = _timed(fns, rounds)
    base_t = t["plain eager + AdamW(fused=True)"]
    label = f"train step, batch {batch}, 3x{size}x{size}" + (", bf16 autocast" if amp else "")
    rows = [{"bench": label, "impl": k, "median_ms": v * 1e3, "vs_plain": v / base_t,
             "band": t.band(k, "plain eager + AdamW(fused=True)")} for k, v in t.items()]
    prof, copy_share = profile_summary(fns["torchfast + torchfast AdamW"])
    return rows, prof, copy_share


def job_report(runs: int = 3, epochs: int = 12) -> list:
    """Wall time of whole `torchfast train` runs vs `torchfast train --eager`, interleaved (each in a
    fresh process, as a user runs them)."""
    times = {"torchfast train": [], "torchfast train --eager": []}
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(torchfast.__file__)))}
    with tempfile.TemporaryDirectory(prefix="torchfast-bench-job-") as out:
        for r in range(runs):
            for label, extra in (("torchfast train", []), ("torchfast train --eager", ["--eager"])):
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "torchfast", "train", "--out", f"{out}/{r}{len(extra)}",
                                "--epochs", str(epochs), *extra], check=True, capture_output=True, env=env)
                times[label].append(time.perf_counter() - start)
    med = Timings(times)
    base = med["torchfast train --eager"]
    return [{"bench": f"main job ({epochs} epochs, digits), whole-run wall time", "impl": k, "median_ms": v * 1e3,
             "vs_plain": v / base, "band": med.band(k, "torchfast train --eager"),
             "runs_s": [round(s, 2) for s in times[k]]} for k, v in med.items()]


def format_rows(rows: list) -> str:
    lines = ["| benchmark | implementation | median ms | vs plain |", "|---|---|---:|---:|"]
    lines += [f"| {r['bench']} | {r['impl']} | {r['median_ms']:.2f} | {r['vs_plain']:.2f} |" for r in rows]
    return "\n".join(lines)


def format_profile(title: str, prof: list) -> str:
    return f"{title}: " + ", ".join(f"{op} {100 * share:.0f}% ({calls:g}/step)" for op, share, calls in prof)


# ---- models we did not write: torchvision's ResNets and timm's ViT, through torchfast.convert ---------

ZOO = ("resnet18", "resnet50", "vit_tiny")


def zoo_model(name: str, size: int, num_classes: int = 10) -> nn.Module:
    """A random-init torchvision / timm model (nothing downloaded) for size x size RGB inputs."""
    if name in ("resnet18", "resnet50"):
        import torchvision
        return getattr(torchvision.models, name)(num_classes=num_classes)
    if name == "vit_tiny":
        import timm
        return timm.create_model("vit_tiny_patch16_224", img_size=size, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; choose from {ZOO}")


def zoo_report(models=ZOO, batch: int = 16, size: int = 64, rounds: int = 10, with_compile: bool = True,
               profile: bool = True) -> tuple:
    """(rows, {model: profile of the converted train step}): each model's train step (forward, backward,
    AdamW: torch's fused=True for torch's variants, torchfast's for the converted model) and inference
    (eval, no_grad), as eager, channels_last eager, torch.compile of the original, and torchfast.convert."""
    rows, profiles = [], {}
    for name in models:
        torch.manual_seed(0)
        original = zoo_model(name, size)
        converted = torchfast.convert(original)
        channels_last = zoo_model(name, size).to(memory_format=torch.channels_last)
        channels_last.load_state_dict(original.state_dict())
        x = torch.randn(batch, 3, size, size)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,))
        variants = {"eager": (original, x), "eager, channels_last": (channels_last, x_cl),
                    "torchfast.convert": (converted, x)}
        if with_compile:
            compiled = zoo_model(name, size)
            compiled.load_state_dict(original.state_dict())
            variants["torch.compile"] = (torch.compile(compiled), x)
        loss_fn = nn.CrossEntropyLoss()

        def train_step(model, inp, fast):
            opt = (torchfast.optim.AdamW(model.parameters(), lr=1e-4) if fast else
                   torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))

            def run():
                opt.zero_grad(set_to_none=True)
                loss_fn(model(inp), y).backward()
                opt.step()
            return run

        for m, _ in variants.values():
            m.train()
        fns = {k: train_step(m, inp, k == "torchfast.convert") for k, (m, inp) in variants.items()}
        t = _timed(fns, rounds)
        rows += [{"bench": f"{name} train step, batch {batch}, 3x{size}x{size}", "impl": k, "median_ms": v * 1e3,
                  "vs_plain": v / t["eager"], "band": t.band(k, "eager")} for k, v in t.items()]
        if profile:
            profiles[name], _ = profile_summary(fns["torchfast.convert"], steps=2)
        for m, _ in variants.values():
            m.eval()
        with torch.no_grad():
            t = _timed({k: (lambda m=m, inp=inp: m(inp)) for k, (m, inp) in variants.items()}, rounds)
        rows += [{"bench": f"{name} inference, batch {batch}, 3x{size}x{size}", "impl": k, "median_ms": v * 1e3,
                  "vs_plain": v / t["eager"], "band": t.band(k, "eager")} for k, v in t.items()]
    return rows, profiles
