"""Scaled dot-product attention, forward+backward (B=4, H=8, D=64, fp32 on the CPU, bf16 on CUDA):
torchfast's flash kernel vs torch's scaled_dot_product_attention vs eager attention.

    pytest benchmarks/ --benchmark-only

`torchfast bench --suites attention` prints the same comparison (forward and forward+backward,
GFLOP/s, ratios measured interleaved in one run) and the peak-memory table.
"""
import pytest
import torch

from torchfast.bench import attention as ba


@pytest.mark.parametrize("L", [512, 2048])
@pytest.mark.parametrize("impl", ba.IMPLS)
def test_attention_fwd_bwd(benchmark, impl, L, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = ba.make_qkv(4, 8, L, 64, device, dtype)
    run = ba.step(impl, q, k, v, backward=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed():
        run()
        sync()

    benchmark.group = f"attention fwd+bwd L={L} {device}"
    benchmark.extra_info["GFLOP"] = ba.flops(4, 8, L, L, 64, backward=True) / 1e9
    benchmark.pedantic(timed, rounds=3 if L > 1024 else 6, iterations=1, warmup_rounds=1)
