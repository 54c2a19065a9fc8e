"""Gradient clipping on the ResNet-18 parameter set: torchfast vs torch.nn.utils.clip_grad_norm_
(foreach), when nothing is clipped and when every call clips; and torchfast Adam(max_grad_norm) vs
torch clip_grad_norm_ + Adam(fused=True).

    pytest benchmarks/ --benchmark-only

`torchfast bench --suites clip` prints the same comparison as one interleaved table with ratios.
"""
import pytest
import torch

import torchfast
from torchfast.bench import optim as bench


@pytest.mark.parametrize("impl", ["torch", "torchfast"])
@pytest.mark.parametrize("clips", [False, True], ids=["no-clip", "clips"])
def test_clip_grad_norm(benchmark, impl, clips, device):
    params = bench.make_params("resnet18", device)
    norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
    tracked = {"norm": norm}
    clip = (lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=True)) if impl == "torch" \
        else torchfast.nn.utils.clip_grad_norm_
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        if clips:  # each call clips by 0.9 of the norm the grads have now
            tracked["norm"] *= 0.9
            clip(params, tracked["norm"])
        else:
            clip(params, 1e6 * norm)
        sync()

    benchmark.group = f"clip_grad_norm_ {'clips' if clips else 'no-clip'} resnet18 {device}"
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=3)


@pytest.mark.parametrize("impl", ["torch clip + fused Adam", "torchfast Adam(max_grad_norm)"])
def test_clipped_adam_step(benchmark, impl, device):
    params = bench.make_params("resnet18", device)
    max_norm = 0.5 * float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if impl.startswith("torch "):
        opt = torch.optim.Adam(params, lr=1e-4, fused=True)

        def run():
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            opt.step()
            sync()
    else:
        opt = torchfast.optim.Adam(params, lr=1e-4, max_grad_norm=max_norm)

        def run():
            opt.step()
            sync()

    benchmark.group = f"clipped Adam step resnet18 {device}"
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=3)
