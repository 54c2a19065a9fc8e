"""torchfast.layout_plan (converted models run CPU inference channels_last inside) and the pre-packed
inference weights of the oneDNN convolutions (torchfast.nn._onednn.PackedWeight)."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfast
from torchfast import layout_plan
from torchfast.nn import _onednn
from torchfast.reference.pool import is_channels_last

torchvision = pytest.importorskip("torchvision")

PLAN = "CPU inference runs channels_last inside"


def _planned(report) -> bool:
    return any(PLAN in what for _, what in report.swaps)


def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _layouts_seen(model, x):
    """The memory layout of each top-level child's input during model(x)."""
    seen = {}
    hooks = [child.register_forward_pre_hook(
        lambda m, args, name=name: seen.__setitem__(name, args[0].is_contiguous(memory_format=torch.channels_last)
                                                    and not args[0].is_contiguous()))
        for name, child in model.named_children()]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def test_resnet_inference_runs_channels_last_inside_and_matches():
    net = _resnet18()
    fast = torchfast.convert(net)
    assert _planned(fast.torchfast_conversion)
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        out, seen = _layouts_seen(fast, x)
        want = net(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert seen["conv1"] and seen["layer1"] and seen["layer4"]
    assert x.is_contiguous()  # the caller's tensor is not touched
    # with gradients recorded (training, or eval mode without no_grad): the NCHW paths, untouched
    _, seen = _layouts_seen(fast, x)
    assert not any(seen.values())
    fast.train()
    _, seen = _layouts_seen(fast, x)
    assert not any(seen.values())


def test_four_d_outputs_come_back_in_the_inputs_layout():
    net = _resnet18()
    body = nn.Sequential(*list(net.children())[:-2])  # a feature extractor: (N, 512, h, w) out
    fast = torchfast.convert(body)
    assert _planned(fast.torchfast_conversion)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, want = fast(x), body(x)
        assert out.is_contiguous() and out.shape == want.shape
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        xl = x.contiguous(memory_format=torch.channels_last)  # a channels_last caller keeps channels_last
        out_cl = fast(xl)
        assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
        torch.testing.assert_close(out_cl, want, rtol=1e-5, atol=1e-5)


class _ViewHead(nn.Module):
    """A block whose forward flattens a feature map with .view: refuses channels_last inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16 * 16, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(x.view(x.size(0), -1))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = _ViewHead()

    def forward(self, x):
        return self.head(x)


def test_a_view_over_the_feature_map_keeps_the_model_on_its_own_layout():
    torch.manual_seed(0)
    net = _Net().eval()
    fast = torchfast.convert(net)
    rep = fast.torchfast_conversion
    assert any("folded" in w for _, w in rep.swaps) and not _planned(rep)
    assert any("layout plan" in why and "view" in why for _, why in rep.skipped), str(rep)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)


def test_layout_safe_verdicts():
    assert layout_plan.layout_safe(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)))
    assert not layout_plan.layout_safe(_ViewHead())
    assert not layout_plan.layout_safe(nn.Sequential(nn.Conv2d(3, 4, 3), nn.PixelShuffle(2)))  # not vetted

    class Branchy(nn.Module):  # data-dependent control flow does not trace: not proven
        def forward(self, x):
            return x if x.sum() > 0 else -x

    assert not layout_plan.layout_safe(Branchy())


def test_a_model_with_nothing_folded_gets_no_plan():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    fast = torchfast.convert(m)
    assert not fast._forward_pre_hooks and not fast.torchfast_conversion.swaps


def test_planned_model_copies_pickles_converts_twice_and_compiles():
    net = _resnet18()
    fast = torchfast.convert(net)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = net(x)
        buf = io.BytesIO()
        torch.save(fast, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        # (reloading re-traces each converted block: its fused calls stay calls)
        assert loaded.layer2[0].code.count("conv_bn_relu(") == fast.layer2[0].code.count("conv_bn_relu(") == 3
        for m in (copy.deepcopy(fast), loaded, torchfast.convert(fast)):
            assert len(m._forward_pre_hooks) == 1
            _, seen = _layouts_seen(m, x)
            assert seen["layer1"]
            torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(fast)
        torch.testing.assert_close(compiled(x), want, rtol=1e-4, atol=1e-4)


def test_inference_mode():
    net = _resnet18()
    fast = torchfast.convert(net)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)  # cached folded / packed weights


@pytest.mark.skipif(not _onednn.CAN_PACK, reason="this torch has no mkldnn._reorder_convolution_weight")
def test_packed_weights_follow_weight_updates_and_input_shapes():
    net = _resnet18()
    fast = torchfast.convert(net)
    with torch.no_grad():
        for shape in ((2, 3, 32, 32), (5, 3, 48, 40), (2, 3, 32, 32)):
            x = torch.randn(shape)
            torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)
        # an in-place update (what an optimizer step or load_state_dict does) reaches the next forward
        for m in (net, fast):
            m.layer4[1].conv2.weight.mul_(-2.0)
            m.layer1[0].bn1.running_var.add_(0.5)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)
        fast.load_state_dict(_resnet18().state_dict())
        torch.testing.assert_close(fast(x), _resnet18()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _onednn.CAN_PACK, reason="this torch has no mkldnn._reorder_convolution_weight")
def test_packed_weight_cache_rules():
    cache = _onednn.PackedWeight()
    w = torch.randn(16, 8, 3, 3)
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    args = ((1, 1), (1, 1), (1, 1), 1)
    nchw = x.contiguous()
    assert cache.get(w, nchw, *args) is w  # NCHW: as it is (the packed path would answer channels_last)
    p = cache.get(w, x, *args)
    assert p.layout == torch._mkldnn and cache.get(w, x, *args) is p  # kept
    assert cache.get(w, torch.randn(3, 8, 16, 16).contiguous(memory_format=torch.channels_last), *args) is not p  # another geometry: repacked
    p = cache.get(w, x, *args)
    w.add_(1.0)
    assert cache.get(w, x, *args) is not p  # a new version: repacked
    wanted = torch.randn(16, 8, 3, 3, requires_grad=True)
    assert cache.get(wanted, x, *args) is wanted  # a weight that gets a gradient: as it is
    with torch.inference_mode():
        inf = torch.randn(16, 8, 3, 3)
    assert cache.get(inf, x, *args) is inf  # no version counter: as it is
    assert copy.deepcopy(cache).entry is None  # the opaque tensor is not copied
    got = _onednn.conv2d_relu(x, w, None, (1, 1), (1, 1), (1, 1), 1, True, cache)
    torch.testing.assert_close(got, F.relu(F.conv2d(x, w, None, 1, 1)), rtol=1e-5, atol=1e-5)


# -- the measured choice between the packed and the planar path (converted models' convolutions) ------

_GEOMETRIES = [  # in channels, out channels, kernel, stride, padding, groups, image
    (8, 16, 3, 1, 1, 1, (9, 7)), (6, 12, 3, 2, 1, 3, (17, 16)), (16, 24, 1, 1, 0, 1, (5, 6)),
    (3, 8, 7, 2, 3, 1, (33, 31)),
    (64, 32, 3, 1, 1, 1, (2, 3))]  # a map this small also has the dense path (_dense_conv)


def _channels_last(*shape):
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not _onednn.CAN_PACK, reason="this torch has no mkldnn._reorder_convolution_weight")
@pytest.mark.parametrize("path", ["packed", "planar", "dense"])
def test_every_path_matches_torch_and_keeps_channels_last(path, monkeypatch):
    monkeypatch.setattr(_onednn, "_forced", path)
    for cin, cout, k, stride, pad, groups, hw in _GEOMETRIES:
        x, w, b = _channels_last(4, cin, *hw), _channels_last(cout, cin // groups, k, k), torch.randn(cout)
        args = ((stride, stride), (pad, pad), (1, 1), groups)
        cache = _onednn.PackedWeight()
        plain = F.conv2d(x, w, b, stride, pad, 1, groups)
        for relu in (False, True):
            got = _onednn.conv2d_relu(x, w, b, *args, relu, cache, choose=True)
            torch.testing.assert_close(got, plain.relu() if relu else plain, rtol=1e-5, atol=1e-5)
            assert is_channels_last(got)
        residual = _channels_last(*plain.shape)
        got = _onednn.conv2d_add_relu(x, residual, w, b, *args, cache, choose=True)
        torch.testing.assert_close(got, (plain + residual).relu(), rtol=1e-5, atol=1e-5)
        assert is_channels_last(got)


@pytest.mark.skipif(not _onednn.CAN_PACK, reason="this torch has no mkldnn._reorder_convolution_weight")
def test_the_choice_is_measured_once_per_geometry_and_keeps_one_weight(monkeypatch):
    monkeypatch.setattr(_onednn, "_choices", {})
    weights_seen = []
    real = _onednn._pointwise
    monkeypatch.setattr(_onednn, "_pointwise", lambda x, w, *a: weights_seen.append(w.layout) or real(x, w, *a))
    x, w, b = _channels_last(2, 8, 16, 16), _channels_last(16, 8, 3, 3), torch.randn(16)
    args = ((1, 1), (1, 1), (1, 1), 1)
    cache = _onednn.PackedWeight()
    first = _onednn.conv2d_relu(x, w, b, *args, True, cache, choose=True)
    assert len(weights_seen) == 2 * (1 + _onednn.MEASURE_ROUNDS)  # both paths: a warm-up and the timed rounds
    (key, choice), = _onednn.chosen_paths().items()
    assert choice in ("packed", "planar")
    assert (cache.entry is None) == (choice == "planar") and (cache.planar_entry is None) == (choice == "packed")
    weights_seen.clear()
    again = _onednn.conv2d_relu(x, w, b, *args, True, cache, choose=True)
    assert weights_seen == [torch._mkldnn if choice == "packed" else torch.strided]  # the chosen path, once
    assert torch.equal(again, first)
    _onednn.conv2d_relu(_channels_last(3, 8, 16, 16), w, b, *args, True, cache, choose=True)
    assert len(_onednn.chosen_paths()) == 2  # another geometry: measured on its own
    weights_seen.clear()
    _onednn.conv2d_relu(x, w, b, *args, True, cache)  # without `choose` (torchfast's own modules): packed
    assert weights_seen == [torch._mkldnn]


@pytest.mark.skipif(not _onednn.CAN_PACK, reason="this torch has no mkldnn._reorder_convolution_weight")
@pytest.mark.parametrize("path", ["packed", "planar", "dense", None])
def test_converted_resnet_is_the_original_on_every_path(path, monkeypatch):
    monkeypatch.setattr(_onednn, "_forced", path)
    monkeypatch.setattr(_onednn, "_choices", {})
    net = _resnet18()
    fast = torchfast.convert(net)
    x = torch.randn(8, 3, 64, 64)  # every convolution's input above MIN_NUMEL; layer4's maps 2x2 (dense)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)
    if path is None:
        assert len(_onednn.chosen_paths()) > 0
