"""Fused ReLU + max pooling (torchfast.nn.functional.relu_max_pool2d, csrc/pool): against
F.max_pool2d(F.relu(x)) forward and backward on odd shapes, both layouts, a strided view, every
dtype, overlapping and padded windows, NaN/-inf/ties; gradcheck, opcheck, torch.compile, errors, and
the fused conv -> ReLU -> pool of ComplexNetwork against the plain modules."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfast
from torchfast.nn.functional import relu_max_pool2d
from torchfast.ops import pool as pool_ops
from torchfast.reference import pool as ref
from conftest import require_kernel, tol

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
WINDOWS = [  # kernel, stride, padding
    ((2, 2), (2, 2), (0, 0)),  # the cheat sheet's MaxPool2d(2)
    ((3, 3), (2, 2), (1, 1)),  # overlapping, padded (ResNet's stem pool)
    ((3, 2), (1, 2), (1, 0)),  # overlapping rows only, rectangular
    ((2, 2), (3, 3), (0, 0)),  # stride > kernel: inputs no window covers
]
SHAPES = [(2, 5, 7, 9), (1, 97, 6, 5), (3, 16, 8, 8), (2, 3, 1, 4)]


def _fits(shape, window):
    (kh, kw), _, (ph, pw) = window
    return shape[2] + 2 * ph >= kh and shape[3] + 2 * pw >= kw


CASES = [(shape, window) for shape in SHAPES for window in WINDOWS if _fits(shape, window)]


def _input(shape, dtype, layout, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # distinct values, a third negative: the ReLU's mask matters, ties do not hide wrong choices
    x = (torch.randperm(torch.Size(shape).numel(), generator=g).double() - torch.Size(shape).numel() / 3)
    x = x.view(shape).to(dtype=dtype, device=device)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a view with a stride on W: neither layout
        wide = torch.zeros(*shape[:-1], shape[-1] * 2, dtype=dtype, device=device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def _torch(x, window, relu):
    kernel, stride, padding = window
    y = F.relu(x) if relu else x
    return F.max_pool2d(y, kernel, stride, padding)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_torch_forward_and_backward(device, case, layout, dtype):
    require_kernel("relu_max_pool2d", device)
    shape, window = case
    for relu in (True, False):
        x = _input(shape, dtype, layout, device).requires_grad_()
        # in fp64 (the values are exact in every dtype): overlapping windows sum gradients, which
        # torch's reduced-precision backward rounds after each term, the kernel once
        xr = x.detach().double().requires_grad_()
        out = pool_ops.relu_max_pool2d(x, *window, relu)[0]  # the kernel, in every layout
        expect = _torch(xr, window, relu)
        assert out.dtype == dtype and out.shape == expect.shape
        torch.testing.assert_close(out, expect.to(dtype), rtol=0, atol=0)  # max pooling is exact
        if layout == "channels_last" and shape[1] > 1:
            assert out.is_contiguous(memory_format=torch.channels_last)
        grad = _input(out.shape, dtype, "contiguous", device, seed=1)
        out.backward(grad)
        expect.backward(grad.double())
        torch.testing.assert_close(x.grad, xr.grad.to(dtype), **tol(dtype))


def test_argmax_matches_reference(device):
    require_kernel("relu_max_pool2d", device)
    for window in WINDOWS:
        for layout in ("contiguous", "channels_last"):
            x = _input((2, 6, 9, 7), torch.float32, layout, device)
            out, argmax = pool_ops.relu_max_pool2d(x, *window, True)
            rout, rargmax = ref.relu_max_pool2d(x, *window, True)
            assert argmax.dtype == torch.uint8
            torch.testing.assert_close(out, rout, rtol=0, atol=0)
            assert torch.equal(argmax, rargmax)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_inf_and_ties_pick_torchs_element(device, layout):
    require_kernel("relu_max_pool2d", device)
    x = torch.tensor([[[[1.0, 1.0, -2.0, float("nan"), 3.0, 3.0],
                        [0.5, 1.0, float("nan"), 0.0, -1.0, 3.0],
                        [-float("inf"), -float("inf"), -1.0, -1.0, 0.0, 0.0],
                        [-float("inf"), -float("inf"), -3.0, -1.0, 0.0, -0.0]]]], device=device)
    x = torch.cat([x, -x, x * 2], dim=1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for window in (((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1))):
        for relu in (True, False):
            a = x.clone().requires_grad_()
            b = x.clone().requires_grad_()
            out = pool_ops.relu_max_pool2d(a, *window, relu)[0]
            expect = _torch(b, window, relu)
            torch.testing.assert_close(out, expect, rtol=0, atol=0, equal_nan=True)
            grad = torch.arange(1.0, out.numel() + 1, device=device).view(out.shape)
            out.backward(grad)
            expect.backward(grad)
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("window", [((3, 3), (2, 2), (1, 1)), ((3, 3), (1, 1), (1, 1)), ((2, 3), (3, 3), (0, 1)),
                                    ((1, 5), (1, 2), (0, 2))], ids=str)
def test_wide_rows_with_many_ties_pick_torchs_element(device, window, dtype):
    """NCHW rows spanning several vectors of output columns with a partial last one, and values from
    a small set (ties in most windows), -inf and NaN among them: the same values, the same element
    picked (so the same gradient) as torch, in every window position, edge columns included."""
    require_kernel("relu_max_pool2d", device)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (2, 3, 9, 77), generator=g).to(dtype)
    special = torch.rand(x.shape, generator=g)
    x[special < 0.02] = float("nan")
    x[(special > 0.02) & (special < 0.05)] = -float("inf")
    x = x.to(device)
    for relu in (True, False):
        a = x.clone().requires_grad_()
        b = x.clone().requires_grad_()
        out, argmax = pool_ops.relu_max_pool2d(a, *window, relu)
        expect = _torch(b, window, relu)
        torch.testing.assert_close(out, expect, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(argmax, ref.relu_max_pool2d(x, *window, relu)[1])
        grad = torch.arange(1.0, out.numel() + 1, dtype=dtype, device=device).view(out.shape)
        out.backward(grad)
        expect.backward(grad)
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)


def test_unbatched_and_int_arguments(device):
    require_kernel("relu_max_pool2d", device)
    x = torch.randn(4, 9, 11, device=device)
    torch.testing.assert_close(relu_max_pool2d(x, 3, 2, 1), F.max_pool2d(F.relu(x), 3, 2, 1))
    torch.testing.assert_close(relu_max_pool2d(x, 2), F.max_pool2d(F.relu(x), 2))
    big = torch.randn(1, 2, 20, 20, device=device)  # a 17x17 window: torch's ops (past the byte argmax)
    torch.testing.assert_close(relu_max_pool2d(big, 17, 1), F.max_pool2d(F.relu(big), 17, 1))


def test_functional_takes_the_kernel_where_it_pays(device):
    """CUDA inputs, channels_last CPU inputs and NCHW fp32/fp64 CPU inputs: the kernel (its op in the
    autograd graph); NCHW fp16/bf16 CPU inputs: torch's ReLU and pool, the faster there."""
    require_kernel("relu_max_pool2d", device)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for layout in ("contiguous", "channels_last"):
            x = _input((2, 8, 6, 6), dtype, layout, device).requires_grad_()
            out = relu_max_pool2d(x, 2)
            kernel = device != "cpu" or layout == "channels_last" or dtype != torch.bfloat16
            assert ("relu_max_pool2d" in type(out.grad_fn).__name__.lower() or
                    "torchfast" in str(out.grad_fn.name())) == kernel, (dtype, layout, out.grad_fn.name())
            torch.testing.assert_close(out, F.max_pool2d(F.relu(x), 2))


def test_empty_batch_and_channels(device):
    require_kernel("relu_max_pool2d", device)
    for shape in ((0, 4, 6, 6), (2, 0, 6, 6)):  # (torch's max_pool2d refuses zero channels)
        x = torch.randn(shape, device=device, requires_grad=True)
        out = pool_ops.relu_max_pool2d(x, [2, 2], [2, 2], [0, 0], True)[0]
        assert out.shape == (*shape[:2], 3, 3)
        out.sum().backward()
        assert x.grad.shape == x.shape


def test_gradcheck_and_double_backward(device):
    require_kernel("relu_max_pool2d", device)
    for window in WINDOWS[:3]:
        x = _input((2, 3, 6, 5), torch.float64, "contiguous", device).div(7).requires_grad_()
        for layout in ("contiguous", "channels_last"):
            t0 = x.detach().contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                       else torch.contiguous_format).requires_grad_()
            fn = lambda t: pool_ops.relu_max_pool2d(t, *window, True)[0]  # noqa: E731
            assert torch.autograd.gradcheck(fn, (t0,))
            assert torch.autograd.gradgradcheck(fn, (t0,))


def test_opcheck(device):
    require_kernel("relu_max_pool2d", device)
    for layout in ("contiguous", "channels_last"):
        x = _input((2, 4, 7, 6), torch.float32, layout, device).requires_grad_()
        args = ([3, 3], [2, 2], [1, 1], True)
        torch.library.opcheck(torch.ops.torchfast.relu_max_pool2d.default, (x, *args))
        out, argmax = torch.ops.torchfast.relu_max_pool2d(x.detach(), *args)
        torch.library.opcheck(torch.ops.torchfast.relu_max_pool2d_backward.default,
                              (torch.randn_like(out), out, argmax, list(x.shape), *args[:3], True,
                               layout == "channels_last"))


def test_compile_fullgraph(device):
    require_kernel("relu_max_pool2d", device)
    x = torch.randn(2, 8, 10, 10, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    fn = torch.compile(lambda t: relu_max_pool2d(t * 2, 2).sum(), fullgraph=True, backend="aot_eager")
    fn(x).backward()
    xr = x.detach().clone().requires_grad_()
    F.max_pool2d(F.relu(xr * 2), 2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_bad_input_gets_a_clear_error():
    require_kernel("relu_max_pool2d", "cpu")
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="at most 256 elements"):
        torch.ops.torchfast.relu_max_pool2d(x, [17, 17], [1, 1], [0, 0], True)
    with pytest.raises(RuntimeError, match="at most half the kernel"):
        torch.ops.torchfast.relu_max_pool2d(x, [2, 2], [2, 2], [2, 0], True)
    with pytest.raises(RuntimeError, match="dtype Long"):
        torch.ops.torchfast.relu_max_pool2d(x.long(), [2, 2], [2, 2], [0, 0], True)
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        torch.ops.torchfast.relu_max_pool2d(torch.randn(1, 1, 2, 2), [3, 3], [1, 1], [0, 0], True)
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        relu_max_pool2d(torch.randn(2, 3, 4, 4, 4), 2)
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair"):
        relu_max_pool2d(x, (2, 2, 2))
    out, argmax = torch.ops.torchfast.relu_max_pool2d(x, [2, 2], [2, 2], [0, 0], True)
    with pytest.raises(RuntimeError, match="must have the pooled shape"):
        torch.ops.torchfast.relu_max_pool2d_backward(out, out, argmax, [2, 3, 12, 12], [2, 2], [2, 2], [0, 0], True,
                                                     False)
    with pytest.raises(RuntimeError, match="argmax must be uint8"):
        torch.ops.torchfast.relu_max_pool2d_backward(out, out, argmax.long(), [2, 3, 8, 8], [2, 2], [2, 2],
                                                     [0, 0], True, False)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1)], ids=["2x2", "3x3s2p1"])
def test_fused_conv_relu_pool_matches_plain_modules(pool, layout):
    """The oneDNN post-op convolution + relu_max_pool2d + its one-pass backward (training) and the
    inference path, against the plain Conv2d -> ReLU -> MaxPool2d."""
    from torchfast.nn import fusion

    require_kernel("relu_max_pool2d", "cpu")
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), pool)
    x = torch.randn(6, 3, 32, 32)
    assert fusion._fusable(plain[0], x)  # above oneDNN's post-op threshold: the fused path, not the fallback
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = fusion.run_fused(plain, xa, {})
    expect = plain(xb)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expect)
    ga = torch.autograd.grad(out, [xa, *plain.parameters()], grad)
    gb = torch.autograd.grad(expect, [xb, *plain.parameters()], grad)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fusion.run_fused(plain, x, {}), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_relu_max_pool_module_is_relu_then_max_pool(device, layout):
    """torchfast.nn.ReLUMaxPool2d: nn.MaxPool2d's constructor, the values and gradients of ReLU ->
    MaxPool2d, the kernel where it takes the window, torch's ops where it does not (ceil_mode,
    dilation, return_indices), no state."""
    for kwargs in ({"kernel_size": 3, "stride": 2, "padding": 1}, {"kernel_size": 2},
                   {"kernel_size": 2, "ceil_mode": True}, {"kernel_size": 3, "dilation": 2},
                   {"kernel_size": 2, "return_indices": True}):
        fast, torchs = torchfast.nn.ReLUMaxPool2d(**kwargs), nn.MaxPool2d(**kwargs)
        assert isinstance(fast, nn.MaxPool2d) and not fast.state_dict()
        x = _input((2, 5, 11, 13), torch.float32, layout, device).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        got, want = fast(x), torchs(F.relu(xr))
        if kwargs.get("return_indices"):
            assert torch.equal(got[1], want[1])
            got, want = got[0], want[0]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        grad = _input(got.shape, torch.float32, "contiguous", device, seed=1)
        got.backward(grad)
        want.backward(grad)
        torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=0)
    compiled = torch.compile(torchfast.nn.ReLUMaxPool2d(3, 2, 1), fullgraph=True)
    x = _input((2, 5, 11, 13), torch.float32, layout, device)
    torch.testing.assert_close(compiled(x), F.max_pool2d(F.relu(x), 3, 2, 1))
