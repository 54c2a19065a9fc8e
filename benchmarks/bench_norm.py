"""Fused batch norm + add + ReLU and the ResidualBlock (batch 32, 64 channels, 32x32, fp32):
torchfast vs eager PyTorch and the cheat sheet's block.

    pytest benchmarks/ --benchmark-only

`torchfast bench --suites norm` prints the same comparison (plus channels_last and torch.compile)
as one interleaved table with ratios.
"""
import pytest
import torch

import torchfast
from torchfast.reference.modules import ResidualBlock as SeedResidualBlock


def _input(device):
    torch.manual_seed(0)
    return torch.randn(32, 64, 32, 32, device=device)


@pytest.mark.parametrize("impl", ["eager", "torchfast"])
def test_bn_add_relu_fwd_bwd(benchmark, impl, device):
    x = _input(device)
    residual = torch.randn_like(x)
    bn = (torch.nn.BatchNorm2d(64) if impl == "eager" else torchfast.nn.BatchNormAddReLU2d(64)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        xi, ri = x.detach().requires_grad_(), residual.detach().requires_grad_()
        y = torch.relu(bn(xi) + ri) if impl == "eager" else bn(xi, ri)
        y.backward(torch.ones_like(y))
        sync()

    benchmark.group = f"BN+add+ReLU fwd+bwd {device}"
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("impl", ["seed", "torchfast"])
def test_residual_block(benchmark, impl, mode, device):
    x = _input(device)
    block = (SeedResidualBlock(64) if impl == "seed" else torchfast.nn.ResidualBlock(64)).to(device)
    block.train(mode == "train")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        if mode == "train":
            block(x.detach().requires_grad_()).sum().backward()
        else:
            with torch.no_grad():
                block(x)
        sync()

    benchmark.group = f"ResidualBlock {mode} {device}"
    benchmark.pedantic(run, rounds=6, iterations=1, warmup_rounds=1)
