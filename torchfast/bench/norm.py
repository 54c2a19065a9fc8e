"""Batch norm suite: fused BN + add + ReLU vs eager (contiguous and channels_last), ReLU + max
pooling (torchfast/bench/pool.py), and the ResidualBlock's train step and inference against the
cheat sheet's block (eager, channels_last, torch.compile)."""
from __future__ import annotations

import torch

import torchfast
from torchfast.bench.pool import pool_rows
from torchfast.bench.timing import interleaved_medians
from torchfast.reference import modules as plain


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
        med = interleaved_medians({"eager": bn_step(bn, inp, res, False), "torchfast": bn_step(fused_bn, inp, res, True)},
                                   device, rounds, warmup)
        for impl in ("eager", "torchfast"):
            rows.append({"bench": f"BN+add+ReLU fwd+bwd{label}", "impl": impl, "median_ms": med[impl] * 1e3,
                         "GB/s": nbytes / med[impl] / 1e9, "ratio": med[impl] / med["eager"],
                         "band": med.band(impl, "eager")})
    rows += pool_rows(device, rounds, warmup, batch, channels, size, dtype)

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
    med = interleaved_medians(fns, device, rounds, warmup)
    for impl, t in med.items():
        rows.append({"bench": "ResidualBlock train step", "impl": impl, "median_ms": t * 1e3, "GB/s": float("nan"),
                     "ratio": t / med["seed block (eager)"], "band": med.band(impl, "seed block (eager)")})

    for m in (seed, ours, seed_cl, compiled_block):
        m.eval()
    with torch.no_grad():
        fns = {"seed block (eager)": lambda: seed(x), "torchfast ResidualBlock": lambda: ours(x),
               "seed block, channels_last": lambda: seed_cl(x_cl),
               "torchfast ResidualBlock, channels_last in": lambda: ours(x_cl)}
        med = interleaved_medians(fns, device, rounds, warmup)
    for impl, t in med.items():
        rows.append({"bench": "ResidualBlock inference", "impl": impl, "median_ms": t * 1e3, "GB/s": float("nan"),
                     "ratio": t / med["seed block (eager)"], "band": med.band(impl, "seed block (eager)")})
    return rows


def format_table(rows) -> str:
    lines = ["| benchmark | impl | median ms | GB/s | vs eager |", "|---|---|---:|---:|---:|"]
    for r in rows:
        gbs = "" if r["GB/s"] != r["GB/s"] else f"{r['GB/s']:.1f}"
        lines.append(f"| {r['bench']} | {r['impl']} | {r['median_ms']:.2f} | {gbs} | {r['ratio']:.2f} |")
    return "\n".join(lines)
