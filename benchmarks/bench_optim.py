"""Optimizer step: torchfast vs torch.optim default (foreach) vs torch.optim fused=True.

    pytest benchmarks/ --benchmark-only

Cases: (a) the ResNet-18 parameter set (62 tensors, 11.7M params), (b) 2,000 tensors of 4,096.
Each benchmark records effective GB/s (28 B/param for Adam/AdamW, 20 for SGD-momentum) in
extra_info. `torchfast bench` prints the same comparison as one interleaved table with ratios.
"""
import pytest
import torch

from torchfast.bench import optim as bench


@pytest.mark.parametrize("impl", bench.IMPLS)
@pytest.mark.parametrize("case", list(bench.CASES))
@pytest.mark.parametrize("kind", list(bench.BYTES_PER_PARAM))
def test_optimizer_step(benchmark, kind, case, impl, device):
    params = bench.make_params(case, device)
    opt = bench.make_optimizer(kind, impl, params)
    numel = sum(p.numel() for p in params)
    benchmark.group = f"{kind} {case} {device}"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        opt.step()
        sync()

    benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=3)
    median = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = round(numel * bench.BYTES_PER_PARAM[kind] / median / 1e9, 2)
    benchmark.extra_info["params"] = numel
