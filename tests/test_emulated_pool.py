"""The CUDA kernels of relu_max_pool2d / relu_max_pool2d_backward, run by the CUDA emulator on CPU
tensors, against the references: both layouts, overlapping, padded and gapped windows, odd sizes,
NaN and ties, every dtype, under every emulated thread schedule."""
import pytest
import torch

from torchfast.reference import pool as ref
from conftest import tol

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CASES = [  # shape, (kernel, stride, padding)
    ((2, 5, 7, 9), ((2, 2), (2, 2), (0, 0))),
    ((1, 33, 6, 5), ((3, 3), (2, 2), (1, 1))),
    ((2, 3, 5, 8), ((3, 2), (1, 2), (1, 0))),
    ((1, 4, 7, 7), ((2, 2), (3, 3), (0, 0))),
]


def _input(shape, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    x = (torch.randperm(n, generator=g).double() - n / 3).view(shape).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-k{c[1][0][0]}{c[1][0][1]}")
def test_forward_and_backward_match_reference(emu, schedule, case, channels_last, dtype):
    shape, window = case
    x = _input(shape, dtype, channels_last)
    for relu in (True, False):
        out, argmax = emu.ops.relu_max_pool2d(x, *window, relu)
        rout, rargmax = ref.relu_max_pool2d(x, *window, relu)
        torch.testing.assert_close(out, rout, rtol=0, atol=0)
        assert torch.equal(argmax, rargmax)
        assert out.stride() == rout.stride()
        grad = _input(out.shape, dtype, channels_last, seed=1)
        args = (grad, out, argmax, list(shape), *window, relu, channels_last)
        gi = emu.ops.relu_max_pool2d_backward(*args)
        torch.testing.assert_close(gi, ref.relu_max_pool2d_backward(*args), **tol(dtype))
        assert gi.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_nan_and_ties(emu, schedule):
    x = torch.tensor([[[[1.0, 1.0, float("nan"), 2.0], [0.5, 1.0, 2.0, float("nan")],
                        [-1.0, -2.0, 0.0, 0.0], [-3.0, -1.0, 0.0, -5.0]]]])
    for relu in (True, False):
        out, argmax = emu.ops.relu_max_pool2d(x, [2, 2], [2, 2], [0, 0], relu)
        rout, rargmax = ref.relu_max_pool2d(x, [2, 2], [2, 2], [0, 0], relu)
        torch.testing.assert_close(out, rout, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(argmax, rargmax)


def test_empty(emu):
    x = torch.randn(0, 3, 4, 4)
    out, argmax = emu.ops.relu_max_pool2d(x, [2, 2], [2, 2], [0, 0], True)
    assert out.shape == (0, 3, 2, 2)
    gi = emu.ops.relu_max_pool2d_backward(out, out, argmax, [0, 3, 4, 4], [2, 2], [2, 2], [0, 0], True, False)
    assert gi.shape == x.shape
