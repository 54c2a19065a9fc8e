"""Whole model: the cheat sheet's ComplexNetwork in plain torch vs torchfast's (batch 32, 3x32x32),
inference (eval, no_grad) and a train step with AdamW.

    pytest benchmarks/bench_models.py --benchmark-only

`torchfast bench --suites models [--job-runs 3]` prints the interleaved comparison with the
profiles' top ops (and the main job's wall time against `torchfast train --eager`).
"""
import pytest
import torch
from torch import nn

import torchfast
from torchfast.bench import models as bm


@pytest.mark.parametrize("impl", ["plain", "torchfast"])
def test_complexnet_inference(benchmark, impl, device):
    if device != "cpu":
        pytest.skip("the layout plan measured here is the CPU's")
    base, fast = bm._pair()
    model = (fast if impl == "torchfast" else base).eval()
    x = torch.randn(32, 3, 32, 32)
    benchmark.group = "ComplexNetwork inference batch 32"
    with torch.no_grad():
        benchmark.pedantic(model, args=(x,), rounds=10, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("impl", ["plain", "torchfast"])
def test_complexnet_train_step(benchmark, impl, device):
    if device != "cpu":
        pytest.skip("the layout plan measured here is the CPU's")
    base, fast = bm._pair()
    model = fast if impl == "torchfast" else base
    opt = torchfast.optim.AdamW(model.parameters()) if impl == "torchfast" else \
        torch.optim.AdamW(model.parameters(), fused=True)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    benchmark.group = "ComplexNetwork train step batch 32"
    benchmark.pedantic(step, rounds=8, iterations=1, warmup_rounds=2)
