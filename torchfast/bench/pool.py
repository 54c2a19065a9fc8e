"""ReLU + max pooling rows (part of the norm suite: the epilogues between a network's convolutions):
torchfast.nn.functional.relu_max_pool2d against eager F.max_pool2d(F.relu(x)), the cheat sheet's
conv -> ReLU -> MaxPool2d(2) tail, forward (inference) and forward + backward: channels_last (NCHW
too on CUDA)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from torchfast.bench.timing import interleaved_medians
from torchfast.nn.functional import relu_max_pool2d


def pool_rows(device="cpu", rounds=10, warmup=2, batch=32, channels=64, size=32, dtype=torch.float32) -> list:
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    rows = []
    # bytes: the forward reads x and writes the pooled output (a quarter); the backward reads the
    # pooled gradient and writes dx. Indices/argmax not counted.
    fwd_bytes = 1.25 * x.numel() * x.element_size()
    layouts = [(", channels_last", x.contiguous(memory_format=torch.channels_last))]
    if torch.device(device).type != "cpu":  # on the CPU, NCHW inputs run torch's ops (ops/pool.py)
        layouts.insert(0, ("", x))
    for label, inp in layouts:
        with torch.no_grad():
            med = interleaved_medians({"eager": lambda: F.max_pool2d(F.relu(inp), 2),
                                       "torchfast": lambda: relu_max_pool2d(inp, 2)}, device, rounds, warmup)
        rows += _rows(f"ReLU+MaxPool2d(2) inference{label}", med, fwd_bytes)

        def step(fused):
            def run():
                xi = inp.detach().requires_grad_()
                out = relu_max_pool2d(xi, 2) if fused else F.max_pool2d(F.relu(xi), 2)
                out.backward(torch.ones_like(out))
            return run

        med = interleaved_medians({"eager": step(False), "torchfast": step(True)}, device, rounds, warmup)
        rows += _rows(f"ReLU+MaxPool2d(2) fwd+bwd{label}", med, 2 * fwd_bytes)
    return rows


def _rows(bench, med, nbytes) -> list:
    return [{"bench": bench, "impl": impl, "median_ms": med[impl] * 1e3, "GB/s": nbytes / med[impl] / 1e9,
             "ratio": med[impl] / med["eager"], "band": med.band(impl, "eager")} for impl in ("eager", "torchfast")]
