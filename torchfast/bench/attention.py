"""Attention benchmarks shared by `torchfast bench --suites attention` and benchmarks/bench_attention.py:
torchfast's flash kernel vs PyTorch's scaled_dot_product_attention (its best path on the device) vs
eager attention (matmul, softmax, matmul), timed interleaved, plus peak extra memory per length."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import torchfast

from torchfast.bench.timing import interleaved_medians
from torchfast.nn.functional import scaled_dot_product_attention as tf_sdpa

IMPLS = ("eager", "torch SDPA", "torchfast")


def eager_attention(q, k, v, is_causal=False):
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    if is_causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def attention_fn(impl: str):
    return {"eager": eager_attention, "torch SDPA": F.scaled_dot_product_attention, "torchfast": tf_sdpa}[impl]


def make_qkv(B, H, L, D, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


def step(impl: str, q, k, v, backward: bool, is_causal=False):
    """One forward (no grad) or forward+backward call of `impl` on fresh leaves."""
    fn = attention_fn(impl)
    if not backward:
        def run():
            with torch.no_grad():
                fn(q, k, v, is_causal=is_causal)
        return run
    grad = torch.randn_like(q[..., : v.size(-1)])

    def run():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        fn(*leaves, is_causal=is_causal).backward(grad)
    return run


def flops(B, H, L, S, D, backward: bool, is_causal=False) -> float:
    """Matmul flops: forward 2 GEMMs of 2*L*S*D; forward+backward 2 + 5 (halved when causal)."""
    f = (2 + (5 if backward else 0)) * 2 * B * H * L * S * D
    return f / 2 if is_causal else f


def eager_fits(B, H, L, dtype=torch.float32, limit=8 << 30) -> bool:
    """Whether eager attention's ~3 (B, H, L, L) tensors stay under `limit` bytes."""
    return 3 * B * H * L * L * torch.finfo(dtype).bits // 8 <= limit


def attention_report(device="cpu", rounds=5, warmup=1, lengths=(512, 2048), B=4, H=8, D=64, dtype=torch.float32,
                     is_causal=False, impls=IMPLS):
    """Forward and forward+backward per length: median ms, GFLOP/s, ratios to SDPA and eager (eager
    only where its score tensors fit, see eager_fits)."""
    rows = []
    for L in lengths:
        q, k, v = make_qkv(B, H, L, D, device, dtype)
        for backward in (False, True):
            fns = {impl: step(impl, q, k, v, backward, is_causal) for impl in impls
                   if impl != "eager" or eager_fits(B, H, L, dtype)}
            med = interleaved_medians(fns, device, rounds, warmup)
            for impl in fns:
                rows.append({"L": L, "pass": "fwd+bwd" if backward else "fwd", "impl": impl,
                             "median_ms": med[impl] * 1e3,
                             "GFLOP/s": flops(B, H, L, L, D, backward, is_causal) / med[impl] / 1e9,
                             "vs_sdpa": med[impl] / med["torch SDPA"] if "torch SDPA" in med else float("nan"),
                             "vs_eager": med[impl] / med["eager"] if "eager" in med else float("nan"),
                             "band": med.band(impl, "torch SDPA") if "torch SDPA" in med else None})
    return rows


def format_attention_table(rows) -> str:
    lines = ["| L | pass | impl | median ms | GFLOP/s | vs SDPA | vs eager |", "|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        fmt = lambda x: "" if x != x else f"{x:.2f}"
        lines.append(f"| {r['L']} | {r['pass']} | {r['impl']} | {r['median_ms']:.1f} | {r['GFLOP/s']:.0f} | "
                     f"{fmt(r['vs_sdpa'])} | {fmt(r['vs_eager'])} |")
    return "\n".join(lines)


# ---- peak memory -----------------------------------------------------------------------------

def _peak_cuda(impl, B, H, L, D, dtype) -> int:
    q, k, v = make_qkv(B, H, L, D, "cuda", dtype)
    run = step(impl, q, k, v, backward=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_cpu_child(impl, B, H, L, D) -> None:
    """Runs in a fresh process: prints how far one forward+backward raises the resident set above
    where it started (Linux: the peak is reset through /proc/self/clear_refs just before)."""
    if impl == "torchfast" and not torchfast.info()["kernels_loaded"]:
        raise RuntimeError(f"torchfast kernels not loaded in the measuring process: {torchfast.info()['status']}")
    q, k, v = make_qkv(B, H, L, D)
    run = step(impl, q, k, v, backward=True)
    # One untimed run of the same problem first: the code and library buffers it touches (kernels,
    # BLAS paths for these block shapes) are then resident before the measurement, which sees only
    # what the run allocates (large blocks go straight back to the system, see peak_memory).
    run()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_kib("VmRSS")
    run()
    print(json.dumps({"bytes": (_proc_status_kib("VmHWM") - before) * 1024}))


def peak_memory(impl, B, H, L, D, device="cpu", dtype=torch.float32) -> int:
    """Peak memory one forward+backward adds beyond its inputs (bytes), outputs and grads included:
    the CUDA allocator's peak, or on the CPU (Linux) the peak resident-set rise in a fresh process
    whose malloc returns large blocks to the system at once (so the RSS follows the allocations)."""
    if device == "cuda":
        return _peak_cuda(impl, B, H, L, D, dtype)
    code = (f"from torchfast.bench.attention import _peak_cpu_child; "
            f"_peak_cpu_child({impl!r}, {B}, {H}, {L}, {D})")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    # Run where this torchfast lives, so the child imports the same build (not a source tree in the cwd).
    home = os.path.dirname(os.path.dirname(os.path.abspath(torchfast.__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=home).stdout
    return json.loads(out.strip().splitlines()[-1])["bytes"]


def memory_report(device="cpu", lengths=(512, 2048, 8192), B=4, H=8, D=64, impls=IMPLS):
    """Peak extra memory of forward+backward per length (fp32); eager is skipped where it would not fit."""
    rows = []
    for L in lengths:
        for impl in impls:
            if impl == "eager" and not eager_fits(B, H, L):
                rows.append({"L": L, "impl": impl, "peak_MiB": float("nan"),
                             "note": f"skipped: its scores alone take {3 * B * H * L * L * 4 / 2**30:.0f} GiB"})
                continue
            rows.append({"L": L, "impl": impl, "peak_MiB": peak_memory(impl, B, H, L, D, device) / 2**20, "note": ""})
    return rows


def format_memory_table(rows) -> str:
    lines = ["| L | impl | peak extra MiB (fwd+bwd) | |", "|---:|---|---:|---|"]
    for r in rows:
        peak = "" if r["peak_MiB"] != r["peak_MiB"] else f"{r['peak_MiB']:.0f}"
        lines.append(f"| {r['L']} | {r['impl']} | {peak} | {r['note']} |")
    return "\n".join(lines)
