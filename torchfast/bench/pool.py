"""ReLU + max pooling rows (part of the norm suite: the epilogues between a network's convolutions):
torchfast.nn.functional.relu_max_pool2d against eager F.max_pool2d(F.relu(x)), the cheat sheet's
conv -> ReLU -> MaxPool2d(2) tail and ResNet's stem pool MaxPool2d(3, 2, 1), forward (inference) and
forward + backward, NCHW and channels_last."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from torchfast.bench.timing import interleaved_medians
from torchfast.nn.functional import relu_max_pool2d


def pool_rows(device="cpu", rounds=10, warmup=2, batch=32, channels=64, size=32, dtype=torch.float32) -> list:
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    rows = []
    layouts = [("", x), (", channels_last", x.contiguous(memory_format=torch.channels_last))]
    windows = [("MaxPool2d(2)", (2, 2, 0)), ("MaxPool2d(3, 2, 1)", (3, 2, 1))]
    for (name, (k, s, p)), (label, inp) in [(w, lay) for w in windows for lay in layouts]:
        # bytes: the forward reads x and writes the pooled output; the backward reads the pooled
        # gradient and writes dx. Indices/argmax not counted.
        nbytes = (x.numel() + F.max_pool2d(x[:1, :1], k, s, p).numel() * batch * channels) * x.element_size()
        with torch.no_grad():
            med = interleaved_medians({"eager": lambda: F.max_pool2d(F.relu(inp), k, s, p),
                                       "torchfast": lambda: relu_max_pool2d(inp, k, s, p)}, device, rounds, warmup)
        rows += _rows(f"ReLU+{name} inference{label}", med, nbytes)

        def step(fused):
            def run():
                xi = inp.detach().requires_grad_()
                out = relu_max_pool2d(xi, k, s, p) if fused else F.max_pool2d(F.relu(xi), k, s, p)
                out.backward(torch.ones_like(out))
            return run

        med = interleaved_medians({"eager": step(False), "torchfast": step(True)}, device, rounds, warmup)
        rows += _rows(f"ReLU+{name} fwd+bwd{label}", med, 2 * nbytes)
    return rows


def _rows(bench, med, nbytes) -> list:
    return [{"bench": bench, "impl": impl, "median_ms": med[impl] * 1e3, "GB/s": nbytes / med[impl] / 1e9,
             "ratio": med[impl] / med["eager"], "band": med.band(impl, "eager")} for impl in ("eager", "torchfast")]
