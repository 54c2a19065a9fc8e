"""The dense-GEMM form of inference convolutions on small maps (torchfast.nn._dense_conv) and its place
among the measured paths of converted models' convolutions (torchfast.nn._onednn)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from torchfast.nn import _dense_conv, _onednn
from torchfast.reference.pool import is_channels_last

_GEOMETRIES = [  # in channels, out channels, kernel (h, w), stride, padding, dilation, image
    (16, 24, (3, 3), (1, 1), (1, 1), (1, 1), (2, 2)),  # ResNet's last stage at 64x64 inputs
    (5, 7, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1)),  # a 1x1 map: only the centre tap
    (5, 7, (3, 3), (1, 1), (1, 1), (1, 1), (2, 3)),
    (6, 4, (5, 3), (1, 2), (2, 1), (1, 1), (3, 4)),
    (6, 4, (3, 3), (2, 2), (1, 1), (1, 1), (3, 3)),
    (6, 4, (3, 3), (1, 1), (2, 2), (2, 2), (3, 3)),  # dilated: taps skip pixels
    (6, 4, (3, 3), (1, 1), (0, 0), (1, 1), (3, 4)),
    (6, 4, (1, 1), (1, 1), (0, 0), (1, 1), (1, 1)),
]


def _brute_force_taps(in_hw, kernel, stride, padding, dilation):
    (h, w), (kh, kw) = in_hw, kernel
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    table = torch.full((ho * wo, h * w), kh * kw, dtype=torch.long)
    for oy, ox, ty, tx in itertools.product(range(ho), range(wo), range(kh), range(kw)):
        iy = oy * stride[0] - padding[0] + ty * dilation[0]
        ix = ox * stride[1] - padding[1] + tx * dilation[1]
        if 0 <= iy < h and 0 <= ix < w:
            table[oy * wo + ox, iy * w + ix] = ty * kw + tx
    return table


@pytest.mark.parametrize("geometry", _GEOMETRIES)
def test_tap_table_joins_the_pixels_a_convolution_joins(geometry):
    _, _, kernel, stride, padding, dilation, hw = geometry
    assert torch.equal(_dense_conv.tap_table(hw, kernel, stride, padding, dilation),
                       _brute_force_taps(hw, kernel, stride, padding, dilation))


@pytest.mark.parametrize("geometry", _GEOMETRIES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_dense_form_is_the_convolution(geometry, channels_last):
    cin, cout, kernel, stride, padding, dilation, hw = geometry
    torch.manual_seed(0)
    x, w, b = torch.randn(3, cin, *hw), torch.randn(cout, cin, *kernel), torch.randn(cout)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    matrix = _dense_conv.dense_matrix(w, hw, stride, padding, dilation, channels_last)
    for bias in (None, b):
        want = F.conv2d(x, w, bias, stride, padding, dilation)
        residual = torch.randn_like(want)
        for relu, res in ((False, None), (True, None), (True, residual)):
            got = _dense_conv.conv2d(x, matrix, bias, want.shape[2:], channels_last, relu, res)
            expected = want if res is None else want + res
            torch.testing.assert_close(got, expected.relu() if relu else expected, rtol=1e-5, atol=1e-5)
            assert got.shape == want.shape
            assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_the_dense_form_applies_only_to_dense_small_matrices():
    x2 = torch.randn(2, 512, 2, 2).contiguous(memory_format=torch.channels_last)
    w = torch.randn(512, 512, 3, 3)
    one = ((1, 1), (1, 1), (1, 1))
    assert _dense_conv.applies(x2, w, *one, 1)
    assert not _dense_conv.applies(x2, torch.randn(512, 256, 3, 3), *one, 2)  # grouped
    assert not _dense_conv.applies(torch.randn(2, 64, 16, 16), torch.randn(64, 64, 3, 3), *one, 1)  # mostly zeros
    assert not _dense_conv.applies(torch.randn(2, 64, 4, 4), torch.randn(64, 64, 3, 3), *one, 1)  # 100 of 256 blocks
    assert not _dense_conv.applies(torch.randn(2, 2048, 2, 2), torch.randn(2048, 2048, 3, 3), *one, 1)  # 256 MiB
    assert not _dense_conv.applies(torch.randn(2, 8, 2, 2)[:, :, :, :1], torch.randn(8, 8, 3, 3), *one, 1)  # strided


def _channels_last(*shape):
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not _onednn.CAN_PACK, reason="this torch has no mkldnn._reorder_convolution_weight")
def test_a_small_map_measures_the_dense_path_too_and_keeps_one_weight(monkeypatch):
    monkeypatch.setattr(_onednn, "_choices", {})
    dense_calls = []
    real = _dense_conv.conv2d
    monkeypatch.setattr(_dense_conv, "conv2d", lambda *a: dense_calls.append(a[1]) or real(*a))
    x, w, b = _channels_last(4, 64, 2, 2), _channels_last(32, 64, 3, 3), torch.randn(32)
    args = ((1, 1), (1, 1), (1, 1), 1)
    cache = _onednn.PackedWeight()
    residual = _channels_last(4, 32, 2, 2)
    first = _onednn.conv2d_add_relu(x, residual, w, b, *args, cache, choose=True)
    assert len(dense_calls) == 1 + _onednn.MEASURE_ROUNDS  # a warm-up and the timed rounds
    assert dense_calls[0] is dense_calls[-1]  # its matrix built once
    (choice,) = _onednn.chosen_paths().values()
    kept = {"packed": cache.entry, "planar": cache.planar_entry, "dense": cache.dense_entry}
    assert [name for name, entry in kept.items() if entry is not None] == [choice]
    torch.testing.assert_close(first, (F.conv2d(x, w, b, 1, 1) + residual).relu(), rtol=1e-5, atol=1e-5)
    assert is_channels_last(first)
    torch.testing.assert_close(_onednn.conv2d_add_relu(x, residual, w, b, *args, cache, choose=True), first)
    assert len(dense_calls) == 1 + _onednn.MEASURE_ROUNDS + (choice == "dense")  # the chosen path only


@pytest.mark.skipif(not _onednn.CAN_PACK, reason="this torch has no mkldnn._reorder_convolution_weight")
def test_the_dense_matrix_follows_weight_updates(monkeypatch):
    monkeypatch.setattr(_onednn, "_forced", "dense")
    x, w, b = _channels_last(4, 16, 2, 2), _channels_last(8, 16, 3, 3), torch.randn(8)
    args = ((1, 1), (1, 1), (1, 1), 1)
    cache = _onednn.PackedWeight()
    got = _onednn.conv2d_relu(x, w, b, *args, True, cache, choose=True)
    torch.testing.assert_close(got, F.relu(F.conv2d(x, w, b, 1, 1)), rtol=1e-5, atol=1e-5)
    matrix = cache.dense_entry[2]
    _onednn.conv2d_relu(x, w, b, *args, True, cache, choose=True)
    assert cache.dense_entry[2] is matrix  # kept
    w.mul_(-0.5)  # an in-place update: a new version
    got = _onednn.conv2d_relu(x, w, b, *args, True, cache, choose=True)
    torch.testing.assert_close(got, F.relu(F.conv2d(x, w, b, 1, 1)), rtol=1e-5, atol=1e-5)
    assert cache.dense_entry[2] is not matrix
    # a map the dense form does not serve falls back to the packed path under the same pin
    big = _channels_last(2, 16, 16, 16)
    torch.testing.assert_close(_onednn.conv2d_relu(big, w, b, *args, True, cache, choose=True),
                               F.relu(F.conv2d(big, w, b, 1, 1)), rtol=1e-5, atol=1e-5)
