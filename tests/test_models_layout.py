"""Whole-model plan of torchfast.models.ComplexNetwork: channels_last from stem to head on the CPU,
conv -> ReLU (-> pool) fused, the attention reading the feature map through views. A drop-in: the
plain network's outputs, gradients, running statistics and state_dict, under torch.compile and
autocast too."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfast
from torchfast.nn import fusion
from torchfast.reference import modules as plain


def _pair(in_channels=3, seed=0):
    torch.manual_seed(seed)
    fast = torchfast.models.ComplexNetwork(10, in_channels)
    base = plain.ComplexNetwork(10, in_channels)
    base.load_state_dict(fast.state_dict())
    for m in (fast, base):
        m.classifier[3].p = 0.0  # no dropout: the two must agree exactly
    return fast, base


def _close(a, b, rtol=1e-5, atol=1e-5, msg=""):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=msg)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_same_outputs_gradients_and_statistics_as_the_plain_network(mode, layout):
    fast, base = _pair()
    fast.train(mode == "train"), base.train(mode == "train")
    x = torch.randn(6, 3, 20, 24)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(2):  # twice: running statistics move in training, caches are reused in eval
        out_f, out_b = fast(x), base(x)
        _close(out_f, out_b)
        (out_f.square().sum()).backward()
        out_b.square().sum().backward()
    for (name, p), q in zip(fast.named_parameters(), base.parameters()):
        _close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b1), b2 in zip(fast.named_buffers(), base.buffers()):
        _close(b1, b2, msg=name)
    with torch.no_grad():
        _close(fast(x), base(x))


def test_state_dict_is_the_plain_networks():
    fast, base = _pair()
    sd_f, sd_b = fast.state_dict(), base.state_dict()
    assert list(sd_f) == list(sd_b)
    for k in sd_f:
        assert torch.equal(sd_f[k], sd_b[k]), k
    again = torchfast.models.ComplexNetwork(10, 3)
    again.load_state_dict(sd_b)
    plain.ComplexNetwork(10, 3).load_state_dict(sd_f)


def test_convolution_weights_follow_the_device_layout():
    fast = torchfast.models.ComplexNetwork(10, 3)
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    fast.double()  # another dtype: still the CPU's layout
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)


def test_no_layout_conversion_between_layers():
    """Inference: the input is converted once; the feature maps are never copied between layers."""
    fast, _ = _pair()
    fast.eval()
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        fast(x)
        with torch.profiler.profile(record_shapes=True) as prof:
            fast(x)
    maps = {(32, 64, 32, 32), (32, 64, 16, 16), (32, 128, 16, 16), (32, 128, 8, 8), (32, 3, 32, 32)}
    copies = [tuple(e.input_shapes[0]) for e in prof.events() if e.name == "aten::copy_" and e.input_shapes]
    feature_map_copies = [s for s in copies if s in maps]
    assert feature_map_copies == [(32, 3, 32, 32)], copies  # the input, once


def test_compiled_and_autocast_match_the_plain_network():
    fast, base = _pair()
    x = torch.randn(4, 3, 16, 16)
    fast.eval(), base.eval()
    with torch.no_grad():
        _close(torch.compile(fast)(x), base(x), rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = fast(x), base(x)
        assert got.dtype == want.dtype
        _close(got.float(), want.float(), rtol=5e-2, atol=5e-2)
    fast.train(), base.train()
    out = torch.compile(fast)(x)
    out.sum().backward()
    base(x).sum().backward()
    _close(fast.features[0].weight.grad, base.features[0].weight.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pool_then_relu_is_relu_then_pool_gradients_included(dtype):
    """The order the non-oneDNN path takes (pool first, the ReLU on a quarter of the elements) is
    exact, ties and all-negative windows included. fp64 and small fp32 inputs take that path."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1).to(dtype)
    pool = nn.MaxPool2d(2)
    with torch.no_grad():
        conv.weight[0] = 0  # channel 0: a constant output (ties in every window)
        conv.bias[1] = -50  # channel 1: every window <= 0
    x = torch.randn(2, 3, 6, 7, dtype=dtype, requires_grad=True)
    ours = fusion.conv_relu_pool(conv, pool, x)
    ref = pool(F.relu(conv(x)))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    g = torch.randn_like(ref)
    params = [x, conv.weight, conv.bias]
    for a, b in zip(torch.autograd.grad(ours, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b)


def test_fused_conv_relu_matches_torch_forward_and_backward():
    """The oneDNN post-op path (CPU fp32, large enough) and its backward against conv + ReLU."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(4, 8, 24, 24).contiguous(memory_format=layout).requires_grad_()
        ours = fusion.conv2d_relu(conv, x, fusion._WeightInLayout())
        ref = F.relu(conv(x))
        _close(ours, ref)
        g = torch.randn_like(ref)
        got = torch.autograd.grad(ours, [x, conv.weight, conv.bias], g)
        want = torch.autograd.grad(ref, [x, conv.weight, conv.bias], g)
        for a, b in zip(got, want):
            _close(a, b, rtol=1e-4, atol=1e-4)


def test_hooks_take_the_plain_forward():
    fast, base = _pair()
    seen = []
    fast.features[1].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    x = torch.randn(2, 3, 8, 8)
    _close(fast(x), base(x))
    assert seen == [(2, 64, 8, 8)]  # the ReLU module ran (not fused away)


def test_forward_mode_ad_takes_the_plain_ops():
    torch.manual_seed(0)
    conv, pool = nn.Conv2d(8, 16, 3, padding=1), nn.MaxPool2d(2)
    x, t = torch.randn(4, 8, 24, 24), torch.randn(4, 8, 24, 24)
    got = torch.func.jvp(lambda a: fusion.conv_relu_pool(conv, pool, a), (x,), (t,))
    want = torch.func.jvp(lambda a: pool(F.relu(conv(a))), (x,), (t,))
    for a, b in zip(got, want):
        _close(a, b, rtol=1e-4, atol=1e-4)


# -- the fused paths at their real sizes, and the drop-in under DDP, autocast and torch.compile ---------

def _grads_close(fast, base, rel=1e-5):
    """Each gradient within `rel` of its own largest magnitude, or of the largest of all where its own is
    ~0 (a convolution bias before a batch norm: its true gradient is zero, both give rounding noise):
    the fp32 summation order differs."""
    top = max(float(q.grad.abs().max()) for q in base.parameters())
    for (name, p), q in zip(fast.named_parameters(), base.parameters()):
        own = float(q.grad.abs().max())
        scale = own if own > 1e-3 * top else top
        _close(p.grad, q.grad, rtol=rel, atol=rel * scale, msg=name)


def _big_input(batch=8):
    # every layer's input above the oneDNN post-op threshold (_onednn.MIN_NUMEL), the stem's included
    return torch.randn(batch, 3, 32, 32)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_stem_and_layers_match_the_plain_network_at_real_sizes(mode):
    from torchfast.nn import _onednn
    fast, base = _pair()
    fast.train(mode == "train"), base.train(mode == "train")
    x = _big_input()
    assert x.numel() >= _onednn.MIN_NUMEL
    y = torch.randint(0, 10, (x.size(0),))
    out_f, out_b = fast(x), base(x)
    _close(out_f, out_b)
    F.cross_entropy(out_f, y).backward()
    F.cross_entropy(out_b, y).backward()
    _grads_close(fast, base)
    for (name, b1), b2 in zip(fast.named_buffers(), base.buffers()):
        _close(b1, b2, msg=name)


def test_training_converts_no_feature_map_between_layers():
    """Training (forward and backward): no copy of an activation-sized tensor other than the input's
    one conversion to channels_last."""
    fast, _ = _pair()
    fast.train()
    x = _big_input()
    fast(x).sum().backward()
    with torch.profiler.profile(record_shapes=True) as prof:
        fast(x).sum().backward()
    copies = [tuple(e.input_shapes[0]) for e in prof.events() if e.name == "aten::copy_" and e.input_shapes]
    n = x.size(0)  # the feature maps (the attention's (n, tokens, heads, head dim) head merge is not one)
    maps = [s for s in copies if s in {(n, 64, 32, 32), (n, 64, 16, 16), (n, 128, 16, 16), (n, 128, 8, 8)}]
    assert maps == [], copies
    assert copies.count(tuple(x.shape)) == 1, copies  # the input, once


def test_ddp_matches_the_plain_network(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        fast, base = _pair()
        fast_ddp, base_ddp = DDP(fast), DDP(base)
        x, y = _big_input(), torch.randint(0, 10, (8,))
        for _ in range(2):
            out_f, out_b = fast_ddp(x), base_ddp(x)
            _close(out_f, out_b)
            F.cross_entropy(out_f, y).backward()
            F.cross_entropy(out_b, y).backward()
        _grads_close(fast, base)
    finally:
        dist.destroy_process_group()


def test_bf16_autocast_training_matches_the_plain_network():
    fast, base = _pair()
    x, y = _big_input(), torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_f, out_b = fast(x), base(x)
        assert out_f.dtype == out_b.dtype
        loss_f, loss_b = F.cross_entropy(out_f, y), F.cross_entropy(out_b, y)
    _close(out_f.float(), out_b.float(), rtol=5e-2, atol=5e-2)
    loss_f.backward()
    loss_b.backward()
    _grads_close(fast, base, rel=5e-2)


def test_compiled_training_matches_the_plain_network():
    fast, base = _pair()
    x, y = _big_input(), torch.randint(0, 10, (8,))
    out_f, out_b = torch.compile(fast)(x), base(x)
    _close(out_f, out_b, rtol=1e-4, atol=1e-4)
    F.cross_entropy(out_f, y).backward()
    F.cross_entropy(out_b, y).backward()
    _grads_close(fast, base, rel=1e-4)
