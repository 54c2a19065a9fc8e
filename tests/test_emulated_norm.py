"""The CUDA kernels of bn_add_relu / bn_add_relu_backward, run by the CUDA emulator on CPU tensors,
against the references: planar and channels_last, the 16-byte vector paths (S or C a multiple of
the pack) and their fallbacks (odd sizes, misaligned storage), C=97, (N, C) and (N, C, 1, 1)
inputs, an empty batch, training and eval, with and without weight, residual and ReLU, under every
emulated thread schedule."""
import pytest
import torch

from torchfast.reference import norm as ref
from conftest import tol

CASES = [  # shape, channels_last, misaligned
    ((4, 16, 8, 8), False, False),  # planar, S % pack == 0: vector path
    ((3, 97, 5, 7), False, False),  # planar, odd S, C=97: scalar path
    ((4, 16, 8, 8), True, False),  # channels_last, C % pack == 0: vector path
    ((2, 97, 3, 5), True, False),  # channels_last, odd C
    ((4, 16, 8, 8), False, True),  # misaligned storage: scalar path
    ((4, 16, 8, 8), True, True),  # channels_last, misaligned
    ((5, 24), False, False),  # (N, C)
    ((6, 40, 1, 1), False, False),  # read as packed rows
    ((2, 8, 33), False, False),  # (N, C, L)
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _make(shape, dtype, channels_last, misaligned, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    if misaligned:  # the same values (and layout) one element into a buffer: not 16-byte aligned
        flat = torch.empty(x.numel() + 1, dtype=dtype)[1:]
        if channels_last:
            n, c, h, w = shape
            return flat.view(n, h, w, c).permute(0, 3, 1, 2).copy_(x)
        return flat.view(shape).copy_(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# Statistics and per-channel sums are accumulated in another order than the reference's (chunk
# partials combined in double): fp32 agrees to ~1e-6 relative, so compare at 1e-5.
STAT_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
# Per-channel gradient sums (N*H*W terms, summed in another order by the kernel's partials than by the
# reference): fp32 rounding grows with the term count and the cancellation among them.
SUM_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _close(a, b, dtype):
    torch.testing.assert_close(a, b, **(STAT_TOL[dtype] if a.dtype == dtype and dtype in STAT_TOL else tol(dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + ("-cl" if c[1] else "")
                         + ("-misaligned" if c[2] else ""))
def test_forward_and_backward_match_reference(emu, schedule, case, dtype):
    shape, channels_last, misaligned = case
    C = shape[1]
    x = _make(shape, dtype, channels_last, misaligned)
    res = _make(shape, dtype, channels_last, misaligned, seed=1)
    grad = _make(shape, dtype, channels_last, misaligned, seed=2)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(3)  # the same statistics whatever ran before
    w = torch.rand(C, dtype=stat, generator=g) + 0.5
    b = torch.randn(C, dtype=stat, generator=g)
    rm, rv = torch.randn(C, dtype=stat, generator=g), torch.rand(C, dtype=stat, generator=g) + 0.1
    variants = [(True, w, b, res, True), (True, None, None, None, False), (False, w, b, res, True),
                (False, w, None, None, True)]
    for training, weight, bias, residual, relu in variants:
        args = (x, weight, bias, residual, rm, rv, training, 1e-5, relu)
        out, mean, invstd, var = emu.ops.bn_add_relu(*args)
        rout, rmean, rinvstd, rvar = ref.bn_add_relu(*args)
        _close(out, rout, dtype)
        assert out.stride() == x.contiguous(memory_format=torch.channels_last if channels_last
                                            else torch.contiguous_format).stride()
        for a, r in ((mean, rmean), (invstd, rinvstd), (var, rvar)):
            torch.testing.assert_close(a, r, **STAT_TOL[stat])
        # the backward from the reference's output, so that both take the same ReLU mask
        bargs = (grad, x, rout, weight, rmean, rinvstd, training, relu, residual is not None)
        mine = emu.ops.bn_add_relu_backward(*bargs)
        theirs = ref.bn_add_relu_backward(*bargs)
        for name, a, r in zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), mine, theirs):
            if name == "grad_residual" and residual is None:
                assert a.numel() == 0
                continue
            # per-channel sums of reduced-precision gradients: compared in their fp32 accumulation
            if name in ("grad_input", "grad_residual"):
                _close(a, r, dtype)
            else:
                torch.testing.assert_close(a, r, **SUM_TOL[stat])


@pytest.mark.parametrize("stream", ["residual", "grad_out"])
def test_one_misaligned_stream_takes_the_scalar_path(emu, schedule, stream):
    """Every pointer of an element-wise launch counts: one misaligned residual (forward) or
    grad_out (backward) beside aligned others."""
    x = _make((4, 16, 8, 8), torch.float16, False, False)
    res = _make((4, 16, 8, 8), torch.float16, False, stream == "residual", seed=1)
    grad = _make((4, 16, 8, 8), torch.float16, False, stream == "grad_out", seed=2)
    args = (x, None, None, res, None, None, True, 1e-5, True)
    out, mean, invstd, var = emu.ops.bn_add_relu(*args)
    rout, rmean, rinvstd, _ = ref.bn_add_relu(*args)
    _close(out, rout, torch.float16)
    bargs = (grad, x, rout, None, rmean, rinvstd, True, True, True)
    for a, r in zip(emu.ops.bn_add_relu_backward(*bargs), ref.bn_add_relu_backward(*bargs)):
        _close(a, r, a.dtype)


def test_empty_batch_and_no_channels(emu, schedule):
    x = torch.randn(0, 8, 4, 4)
    out, mean, invstd, var = emu.ops.bn_add_relu(x, None, None, None, None, None, True, 1e-5, True)
    rout, rmean, rinvstd, rvar = ref.bn_add_relu(x, None, None, None, None, None, True, 1e-5, True)
    assert out.shape == x.shape
    torch.testing.assert_close(mean, torch.zeros(8))
    torch.testing.assert_close(var, torch.zeros(8))
    gi, gw, gb, _ = emu.ops.bn_add_relu_backward(x, x, out, None, mean, invstd, True, True, False)
    assert gi.shape == x.shape and torch.equal(gw, torch.zeros(8)) and torch.equal(gb, torch.zeros(8))
    empty_c = torch.randn(4, 0, 3, 3)
    out, *_ = emu.ops.bn_add_relu(empty_c, None, None, None, None, None, True, 1e-5, True)
    assert out.shape == empty_c.shape


def test_many_chunks_per_channel(emu):
    """A larger planar batch: several partial-sum chunks per channel (blockIdx.y), combined in the
    finalize kernel."""
    x = _make((64, 3, 16, 16), torch.float32, False, False)
    emu.reset_launch_stats()
    out, mean, invstd, var = emu.ops.bn_add_relu(x, None, None, None, None, None, True, 1e-5, False)
    rout, rmean, rinvstd, rvar = ref.bn_add_relu(x, None, None, None, None, None, True, 1e-5, False)
    torch.testing.assert_close(out, rout, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, rvar, rtol=1e-5, atol=1e-6)
    stats = emu.launch_stats()
    partials = [v for k, v in stats.items() if "channel_partials_kernel" in k]
    assert partials and max(v["blocks"] / v["launches"] for v in partials) > 3
