"""Gradient clipping suite: torchfast's clip_grad_norm_ vs torch's (foreach), and the clip folded into
torchfast's Adam step vs torch's clip + Adam(fused=True), on the optimizer suite's parameter sets."""
from __future__ import annotations

import torch

import torchfast
from torchfast.bench.optim import make_params
from torchfast.bench.timing import interleaved_medians


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
        med = interleaved_medians(fns, device, rounds, warmup)
        # bytes: one read of the grads, plus a read and a write when it clips
        nbytes = numel * 4 * (3 if label == "clips" else 1)
        for impl in ("torch", "torchfast"):
            rows.append({"bench": f"clip_grad_norm_ ({label})", "case": case, "impl": impl,
                         "median_ms": med[impl] * 1e3, "GB/s": nbytes / med[impl] / 1e9,
                         "ratio": med[impl] / med["torch"], "band": med.band(impl, "torch")})
    clip_always = 0.5 * tracked["norm"]  # below the grads' norm: both clip on every step
    fused = torch.optim.Adam(params, lr=1e-4, fused=True)
    ours = torchfast.optim.Adam(params, lr=1e-4, max_grad_norm=clip_always)

    def torch_clip_adam():
        torch.nn.utils.clip_grad_norm_(params, clip_always, foreach=True)
        fused.step()

    med = interleaved_medians({"torch": torch_clip_adam, "torchfast": ours.step}, device, rounds, warmup)
    for impl, label in (("torch", "clip_grad_norm_ + Adam(fused=True)"), ("torchfast", "Adam(max_grad_norm)")):
        rows.append({"bench": "clipped Adam step", "case": case, "impl": label, "median_ms": med[impl] * 1e3,
                     "GB/s": numel * 32 / med[impl] / 1e9, "ratio": med[impl] / med["torch"],
                     "band": med.band(impl, "torch")})
    return rows


def format_table(rows) -> str:
    lines = ["| benchmark | case | impl | median ms | GB/s | vs torch |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['bench']} | {r['case']} | {r['impl']} | {r['median_ms']:.2f} | {r['GB/s']:.1f} | "
                     f"{r['ratio']:.2f} |")
    return "\n".join(lines)


