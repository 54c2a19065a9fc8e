"""Whole models: the cheat sheet's ComplexNetwork in plain torch vs torchfast's (batch 32, 3x32x32),
inference (eval, no_grad; plain with an NCHW and a channels_last input, torchfast, onnxruntime fp32 of
torchfast's export) and a train step with AdamW (fp32 and under bf16 autocast); and the models we did
not write (torchvision ResNet-18 and ResNet-50, timm ViT-tiny; batch 16, 3x64x64) as eager, channels_last
eager, torch.compile of the original and torchfast.convert.

    pytest benchmarks/bench_models.py --benchmark-only

`torchfast bench --suites models [--job-runs 3]` prints the same comparisons interleaved, with the
profiles' top ops (and the main job's wall time against `torchfast train --eager`).
"""
import contextlib
import os
import tempfile

import pytest
import torch
from torch import nn

import torchfast
from torchfast.bench import models as bm


def _cpu_only(device):
    if device != "cpu":
        pytest.skip("the layout plan measured here is the CPU's")


def _onnxruntime_model(fast, x):
    try:
        from torchfast.deploy import OrtModule, export_onnx
        path = os.path.join(tempfile.mkdtemp(prefix="torchfast-bench-models-"), "complexnet.onnx")
        return OrtModule(export_onnx(fast, x[:2], path).path)
    except ImportError as e:
        pytest.skip(f"onnxruntime export needs the onnx extra: {e}")


@pytest.mark.parametrize("impl", ["plain", "plain, channels_last input", "torchfast", "onnxruntime fp32"])
def test_complexnet_inference(benchmark, impl, device):
    _cpu_only(device)
    base, fast = bm._pair()
    base.eval(), fast.eval()
    x = torch.randn(32, 3, 32, 32)
    model = base
    if impl == "plain, channels_last input":
        x = x.contiguous(memory_format=torch.channels_last)
    elif impl == "torchfast":
        model = fast
    elif impl == "onnxruntime fp32":
        model = _onnxruntime_model(fast, x)
    benchmark.group = "ComplexNetwork inference batch 32"
    with torch.no_grad():
        benchmark.pedantic(model, args=(x,), rounds=10, iterations=1, warmup_rounds=2)


def _train_step(model, opt, x, y, amp=False):
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


def _adamw(model, fast):
    return torchfast.optim.AdamW(model.parameters(), lr=1e-4) if fast else \
        torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("impl", ["plain", "torchfast"])
def test_complexnet_train_step(benchmark, impl, amp, device):
    _cpu_only(device)
    base, fast = bm._pair()
    model = fast if impl == "torchfast" else base
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    benchmark.group = "ComplexNetwork train step batch 32" + (", bf16 autocast" if amp else "")
    benchmark.pedantic(_train_step(model, _adamw(model, impl == "torchfast"), x, y, amp),
                       rounds=8, iterations=1, warmup_rounds=2)


ZOO_IMPLS = ["eager", "eager, channels_last", "torch.compile", "torchfast.convert"]


def _zoo(name, impl):
    """(model, input layout) for one of ZOO_IMPLS."""
    torch.manual_seed(0)
    model = bm.zoo_model(name, 64)
    if impl == "torchfast.convert":
        return torchfast.convert(model), torch.contiguous_format
    if impl == "eager, channels_last":
        return model.to(memory_format=torch.channels_last), torch.channels_last
    return (torch.compile(model) if impl == "torch.compile" else model), torch.contiguous_format


def _zoo_case(name, impl, device, train):
    _cpu_only(device)
    model, layout = _zoo(name, impl)
    return model.train(train), torch.randn(16, 3, 64, 64).contiguous(memory_format=layout)


@pytest.mark.parametrize("impl", ZOO_IMPLS)
@pytest.mark.parametrize("name", bm.ZOO)
def test_zoo_train_step(benchmark, name, impl, device):
    model, x = _zoo_case(name, impl, device, train=True)
    y = torch.randint(0, 10, (16,))
    benchmark.group = f"{name} train step, batch 16, 3x64x64"
    step = _train_step(model, _adamw(model, impl == "torchfast.convert"), x, y)
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ZOO_IMPLS)
@pytest.mark.parametrize("name", bm.ZOO)
def test_zoo_inference(benchmark, name, impl, device):
    model, x = _zoo_case(name, impl, device, train=False)
    benchmark.group = f"{name} inference, batch 16, 3x64x64"
    with torch.no_grad():
        benchmark.pedantic(model, args=(x,), rounds=10, iterations=1, warmup_rounds=2)
