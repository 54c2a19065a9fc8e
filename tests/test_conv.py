"""torchfast.nn.Conv2d: nn.Conv2d with a pre-packed weight in CPU fp32 inference. The same results as
nn.Conv2d on odd geometries, the same training path, the cache following the weight, and every way a
module is copied, traced or compiled."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import torchfast
from torchfast.nn import _onednn

GEOMETRIES = [  # constructor kwargs, input shape
    ({"in_channels": 3, "out_channels": 64, "kernel_size": 7, "stride": 2, "padding": 3}, (4, 3, 37, 41)),
    ({"in_channels": 16, "out_channels": 24, "kernel_size": 3, "padding": 2, "dilation": 2, "bias": False},
     (2, 16, 23, 19)),
    ({"in_channels": 12, "out_channels": 18, "kernel_size": (3, 1), "stride": (1, 2), "groups": 3}, (3, 12, 29, 31)),
    ({"in_channels": 3, "out_channels": 8, "kernel_size": 16, "stride": 16}, (2, 3, 96, 96)),  # a ViT patch embed
]


def _pair(kwargs, seed=0):
    torch.manual_seed(seed)
    plain = nn.Conv2d(**kwargs)
    fast = torchfast.nn.Conv2d(**kwargs)
    fast.load_state_dict(plain.state_dict())
    assert list(fast.state_dict()) == list(plain.state_dict())
    return plain, fast


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=str)
@pytest.mark.parametrize("kwargs,shape", GEOMETRIES, ids=lambda v: str(v)[:40])
def test_inference_matches_nn_conv2d_and_packs(kwargs, shape, layout):
    plain, fast = _pair(kwargs)
    x = torch.randn(shape).contiguous(memory_format=layout)
    with torch.no_grad():
        want, got = plain(x), fast(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous() == want.is_contiguous()  # the output keeps nn.Conv2d's layout (.view works)
    # NCHW inputs are not packed: beside a packed weight oneDNN would answer in channels_last
    packs = _onednn.CAN_PACK and x.numel() >= _onednn.MIN_NUMEL and layout == torch.channels_last
    assert (getattr(fast, "_torchfast_packed", None) is not None) == packs
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)


def test_training_is_nn_conv2d():
    plain, fast = _pair(GEOMETRIES[0][0])
    x = torch.randn(GEOMETRIES[0][1])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = plain(xa), fast(xb)
    assert torch.equal(got, want)  # the very same computation
    want.square().sum().backward()
    got.square().sum().backward()
    assert torch.equal(xb.grad, xa.grad) and torch.equal(fast.weight.grad, plain.weight.grad)
    assert getattr(fast, "_torchfast_packed", None) is None  # nothing packed for training


def test_packed_weight_follows_the_weight():
    plain, fast = _pair(GEOMETRIES[0][0])
    x = torch.randn(GEOMETRIES[0][1])
    with torch.no_grad():
        fast(x)
        for step in range(2):
            for m in (plain, fast):
                m.weight.mul_(0.5).add_(0.1 * step)  # in place: the version counter moves
            torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
        plain.weight.copy_(torch.randn_like(plain.weight))
        fast.load_state_dict(plain.state_dict())
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
        y = torch.randn(2, 3, 50, 45)  # a new geometry: repacked for it
        torch.testing.assert_close(fast(y), plain(y), rtol=1e-5, atol=1e-5)


def test_copies_pickles_traces_and_compiles():
    plain, fast = _pair(GEOMETRIES[0][0])
    x = torch.randn(GEOMETRIES[0][1])
    with torch.no_grad():
        fast(x)  # a packed weight in the cache: copies must start without it
        want = plain(x)
        clone = copy.deepcopy(fast)
        buf = io.BytesIO()
        torch.save(fast, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for m in (clone, loaded, pickle.loads(pickle.dumps(fast))):
            assert type(m) is torchfast.nn.Conv2d
            torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
        traced = torch.jit.trace(fast, x)  # traces nn.Conv2d's forward (no opaque packed weight)
        torch.testing.assert_close(traced(x), want, rtol=1e-5, atol=1e-5)
        gm = torch.fx.symbolic_trace(fast)
        torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(fast, fullgraph=True)
        torch.testing.assert_close(compiled(x), want, rtol=1e-4, atol=1e-4)
        exported = torch.export.export(fast, (x,))
        torch.testing.assert_close(exported.module()(x), want, rtol=1e-5, atol=1e-5)


def test_other_cases_take_nn_conv2d():
    """bf16, autocast, padding modes and string padding: nn.Conv2d's forward (no cache made)."""
    cases = [(dict(GEOMETRIES[0][0], padding_mode="reflect"), torch.float32, False),
             (dict(GEOMETRIES[0][0], padding="same", stride=1), torch.float32, False),
             (GEOMETRIES[0][0], torch.bfloat16, False), (GEOMETRIES[0][0], torch.float32, True)]
    for kwargs, dtype, autocast in cases:
        plain, fast = _pair(kwargs)
        plain, fast = plain.to(dtype), fast.to(dtype)
        x = torch.randn(GEOMETRIES[0][1], dtype=dtype)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert torch.equal(fast(x), plain(x))
        assert getattr(fast, "_torchfast_packed", None) is None, (kwargs, dtype, autocast)


def test_convert_swaps_only_the_unfolded_convolutions():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    fast = torchfast.convert(net)
    swapped = [p for p, w in fast.torchfast_conversion.swaps if w.startswith("nn.Conv2d -> torchfast.nn.Conv2d")]
    assert swapped == ["conv1"]  # the stem: every block convolution folds into its batch norm
    assert type(fast.conv1) is torchfast.nn.Conv2d and type(fast.layer1[0].conv1) is nn.Conv2d
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-4, atol=1e-4)
    from torchfast.deploy.plain import to_plain

    plain = to_plain(fast)  # what quantizers see: torch's own nn.Conv2d again, no cache
    assert type(plain.conv1) is nn.Conv2d and "_torchfast_packed" not in plain.conv1.__dict__
    with torch.no_grad():
        torch.testing.assert_close(plain(x), net(x), rtol=1e-4, atol=1e-4)
