"""Training convolutions on small output maps through im2col + GEMM (torchfast.nn._train_conv): the
same values and gradients as torch's convolution, double backward, the measured choice, and which
calls it leaves to the module."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfast
from torchfast.nn import _train_conv

_GEOMETRIES = [  # in channels, out channels, kernel, stride, padding, dilation, image, bias
    (16, 24, (3, 3), (1, 1), (1, 1), (1, 1), (2, 2), False),  # ResNet's last stage at 64x64 inputs
    (8, 12, (3, 3), (2, 2), (1, 1), (1, 1), (4, 4), True),  # its downsampling convolution
    (8, 12, (1, 1), (2, 2), (0, 0), (1, 1), (3, 4), False),  # the 1x1 shortcut, odd map
    (5, 7, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), True),
    (5, 7, (5, 3), (1, 2), (2, 1), (1, 1), (2, 3), True),
    (6, 4, (3, 3), (1, 1), (2, 2), (2, 2), (2, 2), False),
    (6, 4, (3, 3), (1, 1), (0, 0), (1, 1), (3, 4), True),
]


@pytest.mark.parametrize("geometry", _GEOMETRIES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_im2col_is_the_convolution_forward_and_backward(geometry, channels_last):
    cin, cout, kernel, stride, padding, dilation, hw, with_bias = geometry
    torch.manual_seed(0)
    x = torch.randn(3, cin, *hw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, *kernel)
    b = torch.randn(cout) if with_bias else None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    want = F.conv2d(x, w, b, stride, padding, dilation)
    out_hw = tuple(want.shape[2:])
    got = _train_conv.im2col_conv2d(x, w, b, stride, padding, dilation, out_hw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    grad = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(want, leaves, grad)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)
        assert a.stride() == e.stride() or a.is_contiguous()  # the weight gradient in the weight's layout


def test_im2col_gradcheck_and_double_backward():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    f = lambda x_, w_, b_: _train_conv.im2col_conv2d(x_, w_, b_, (1, 1), (1, 1), (1, 1), (2, 3))
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def _conv_and_input(hw=(2, 2), **kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, **kwargs)
    return conv, torch.randn(4, 8, *hw, requires_grad=True)


def test_the_choice_is_measured_once_per_geometry(monkeypatch):
    monkeypatch.setattr(_train_conv, "_choices", {})
    calls = []
    real = _train_conv.im2col_conv2d
    monkeypatch.setattr(_train_conv, "im2col_conv2d", lambda *a: calls.append(a[0]) or real(*a))
    conv, x = _conv_and_input()
    out = _train_conv.conv2d(conv, x, conv)
    (choice,) = _train_conv.chosen_paths().values()
    measured = 1 + _train_conv.MEASURE_ROUNDS  # a warm-up and the timed rounds
    assert len(calls) == measured + (choice == "im2col")  # then the call itself, if im2col won
    assert all(c is not x for c in calls[:measured])  # measured on copies
    torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
    assert conv.weight.grad is None and x.grad is None  # the measurement touched no real tensor's gradient
    monkeypatch.setattr(_train_conv, "_choices", {})
    state = torch.get_rng_state()
    _train_conv.conv2d(conv, x, conv)
    assert torch.equal(torch.get_rng_state(), state)  # nor the random stream (dropout after it stays the same)
    (choice,) = _train_conv.chosen_paths().values()
    calls.clear()
    _train_conv.conv2d(conv, x, conv)
    assert len(calls) == (choice == "im2col")  # the chosen path only
    _train_conv.conv2d(conv, torch.randn(4, 8, 1, 2, requires_grad=True), conv)
    assert len(_train_conv.chosen_paths()) == 2  # another geometry: measured on its own


@pytest.mark.parametrize("path", ["conv", "im2col"])
def test_either_path_trains_like_the_module(path, monkeypatch):
    monkeypatch.setattr(_train_conv, "_forced", path)
    conv, x = _conv_and_input()
    want = conv(x)
    got = _train_conv.conv2d(conv, x, conv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(want)
    params = (x, conv.weight, conv.bias)
    for a, e in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(want, params, grad)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)


def test_calls_it_does_not_serve_go_to_the_module(monkeypatch):
    monkeypatch.setattr(_train_conv, "_forced", "im2col")
    seen = []
    monkeypatch.setattr(_train_conv, "im2col_conv2d", lambda *a: seen.append(a) or pytest.fail("im2col taken"))
    conv, x = _conv_and_input()
    big_conv, big = _conv_and_input(hw=(8, 8))
    cases = [(big_conv, big)]  # an output map larger than MAX_OUT_PIXELS
    cases.append((_conv_and_input(groups=2)[0], x))
    cases.append((_conv_and_input(padding_mode="reflect")[0], x))
    cases.append((conv.double(), x.detach().double().requires_grad_()))
    with torch.no_grad():
        assert not _train_conv.candidate(_conv_and_input()[0], x)
    frozen, _ = _conv_and_input()
    frozen.requires_grad_(False)
    cases.append((frozen, x.detach()))  # nothing to differentiate
    for module, inp in cases:
        assert not _train_conv.candidate(module, inp)
        torch.testing.assert_close(_train_conv.conv2d(module, inp, module), module(inp))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _train_conv.candidate(*_conv_and_input())
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)  # the module call would fire it
    try:
        assert not _train_conv.candidate(*_conv_and_input())
    finally:
        handle.remove()
    assert _train_conv.candidate(*_conv_and_input())
    assert not seen


@pytest.mark.parametrize("path", ["conv", "im2col"])
def test_torchfast_layers_train_through_it(path, monkeypatch):
    monkeypatch.setattr(_train_conv, "_forced", path)
    taken = []
    real = _train_conv.im2col_conv2d
    monkeypatch.setattr(_train_conv, "im2col_conv2d", lambda *a: taken.append(1) or real(*a))
    torch.manual_seed(0)
    plain_conv = nn.Conv2d(8, 16, 3, padding=1)
    ours = torchfast.nn.Conv2d(8, 16, 3, padding=1)
    ours.load_state_dict(plain_conv.state_dict())
    plain_stack = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    fused = torchfast.nn.ConvBNReLU2d(8, 16, 3, padding=1)
    fused.load_state_dict(plain_stack.state_dict())
    x = torch.randn(4, 8, 2, 2, requires_grad=True)
    for want_module, got_module in ((plain_conv, ours), (plain_stack, fused)):
        want, got = want_module(x), got_module(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(want)
        wanted = torch.autograd.grad(want, [x, *want_module.parameters()], grad)
        for a, e in zip(torch.autograd.grad(got, [x, *got_module.parameters()], grad), wanted):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    assert len(taken) == (2 if path == "im2col" else 0)


def test_converted_resnet_trains_like_the_original_on_either_path(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    for path in ("conv", "im2col"):
        monkeypatch.setattr(_train_conv, "_forced", path)
        torch.manual_seed(0)
        net = torchvision.models.resnet18(num_classes=10)
        fast = torchfast.convert(net)
        x = torch.randn(4, 3, 64, 64)  # layer4's maps 2x2: its convolutions are candidates
        want, got = net(x), fast(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        want.square().sum().backward()
        got.square().sum().backward()
        for (name, p), q in zip(net.named_parameters(), fast.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(), msg=name)
        for (name, a), b in zip(net.named_buffers(), fast.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_no_measurement_under_saved_tensor_hooks_or_inside_a_backward(monkeypatch):
    """torch.utils.checkpoint and save_on_cpu would take the measurement's saved tensors for their own;
    a reentrant checkpoint recomputes its forward inside the backward: there the call takes torch's
    convolution, and a later call measures."""
    monkeypatch.setattr(_train_conv, "_choices", {})
    conv, x = _conv_and_input()
    with torch.autograd.graph.save_on_cpu():
        out = _train_conv.conv2d(conv, x, conv)
    assert not _train_conv.chosen_paths()
    torch.testing.assert_close(out, conv(x))
    for reentrant in (True, False):
        x.grad = None
        y = torch.utils.checkpoint.checkpoint(lambda t: _train_conv.conv2d(conv, t, conv).square().sum(), x,
                                              use_reentrant=reentrant)
        y.backward()  # (a reentrant checkpoint takes .backward() only)
        torch.testing.assert_close(x.grad, torch.autograd.grad(conv(x).square().sum(), x)[0])
        assert not _train_conv.chosen_paths()
    _train_conv.conv2d(conv, x, conv)
    assert len(_train_conv.chosen_paths()) == 1
    instance_forward, _ = _conv_and_input()
    instance_forward.forward = lambda t: torch.zeros(1)  # an instance-level forward: the module call
    assert not _train_conv.candidate(instance_forward, x)
