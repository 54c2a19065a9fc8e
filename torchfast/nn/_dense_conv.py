"""Inference convolutions on feature maps about as small as the kernel's reach, as one dense GEMM (CPU).

On such a map (ResNet's last stage at 64x64 inputs: 3x3 convolutions on 2x2 maps) every output pixel
sees every input pixel through some tap, so the convolution is a dense linear map from a sample's
H*W*C_in inputs to its Ho*Wo*C_out outputs. Its matrix, built once per weight and geometry, turns the
convolution into one BLAS GEMM over the batch that does exactly the multiply-adds the convolution needs
(none for taps that fall into the padding). Measured on an Intel Xeon (2 threads, batch 16, 512
channels, 2x2, 3x3 kernel): torch's convolution 3.1 ms, oneDNN's post-op convolution 3.4-4.6 ms, this
1.2 ms. Only where the matrix is dense (MIN_DENSITY of its (output pixel, input pixel) blocks joined by
a tap) and not large (MAX_BYTES); the measured choice in `_onednn` then takes it only where it wins.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

from torchfast.reference.pool import is_channels_last

MIN_DENSITY = 0.75  # below it the matrix multiplies more zeros than a direct convolution skips
MAX_BYTES = 64 << 20  # the matrix is kept beside the weight: bound what that costs


def conv_out_hw(in_hw: Sequence[int], kernel_hw: Sequence[int], stride, padding, dilation) -> tuple:
    """A convolution's output map size (Ho, Wo)."""
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, s, p, d in zip(in_hw, kernel_hw, stride, padding, dilation))


@functools.lru_cache(maxsize=256)
def tap_table(in_hw: tuple, kernel_hw: tuple, stride: tuple, padding: tuple, dilation: tuple) -> Tensor:
    """[Ho*Wo, H*W] int64: the kernel tap (kh * kw index) joining output pixel p and input pixel q, or
    kh*kw where no tap joins them (the row-major pixel order of both maps)."""
    per_dim = []
    out_hw = conv_out_hw(in_hw, kernel_hw, stride, padding, dilation)
    for size, out_size, k, s, pad, d in zip(in_hw, out_hw, kernel_hw, stride, padding, dilation):
        offset = torch.arange(size)[None, :] - torch.arange(out_size)[:, None] * s + pad  # [out, in]
        valid = (offset >= 0) & (offset % d == 0) & (offset // d < k)
        per_dim.append((torch.where(valid, offset // d, 0), valid))
    (ty, vy), (tx, vx) = per_dim
    kh, kw = kernel_hw
    taps = ty[:, None, :, None] * kw + tx[None, :, None, :]  # [Ho, Wo, H, W]
    valid = vy[:, None, :, None] & vx[None, :, None, :]
    return torch.where(valid, taps, kh * kw).reshape(vy.size(0) * vx.size(0), vy.size(1) * vx.size(1))


def applies(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
            groups: int) -> bool:
    """Whether this convolution has a dense-GEMM form worth measuring."""
    if groups != 1 or x.dim() != 4 or not (x.is_contiguous() or is_channels_last(x)):
        return False
    taps = tap_table(tuple(x.shape[2:]), tuple(weight.shape[2:]), tuple(stride), tuple(padding), tuple(dilation))
    if taps.numel() == 0:
        return False
    density = (taps < weight.size(2) * weight.size(3)).float().mean().item()
    matrix_bytes = taps.numel() * weight.size(0) * weight.size(1) * weight.element_size()
    return density >= MIN_DENSITY and matrix_bytes <= MAX_BYTES


def dense_matrix(weight: Tensor, in_hw: Sequence[int], stride, padding, dilation, channels_last: bool) -> Tensor:
    """The convolution as a [H*W*C_in, Ho*Wo*C_out] matrix, rows and columns in the memory order of a
    sample of the input and of the output in that layout (channels_last: pixel-major; NCHW:
    channel-major), so that both sides are views of the activations."""
    c_out, c_in, kh, kw = weight.shape
    taps = tap_table(tuple(in_hw), (kh, kw), tuple(stride), tuple(padding), tuple(dilation))
    with_zero = torch.cat([weight.detach().reshape(c_out, c_in, kh * kw), weight.new_zeros(c_out, c_in, 1)], 2)
    blocks = with_zero[:, :, taps]  # [C_out, C_in, P (output pixels), Q (input pixels)]
    order = (3, 1, 2, 0) if channels_last else (1, 3, 0, 2)  # rows (Q, C_in) | (C_in, Q), columns likewise
    return blocks.permute(order).reshape(taps.size(1) * c_in, taps.size(0) * c_out).contiguous()


def conv2d(x: Tensor, matrix: Tensor, bias: Optional[Tensor], out_hw: Sequence[int], channels_last: bool,
           relu: bool, residual: Optional[Tensor] = None) -> Tensor:
    """relu?(conv2d(x) (+ residual)) through `matrix` (dense_matrix's, for the same `channels_last`: x's
    layout); the output in that layout."""
    n = x.size(0)
    ho, wo = out_hw
    pixels = ho * wo
    c_out = matrix.size(1) // pixels
    rows = (x.permute(0, 2, 3, 1) if channels_last else x).reshape(n, -1)  # a view of either layout
    if bias is None:
        flat = torch.mm(rows, matrix)
    else:
        flat = torch.addmm(bias.repeat(pixels) if channels_last else bias.repeat_interleave(pixels), rows, matrix)
    out = (flat.view(n, ho, wo, c_out).permute(0, 3, 1, 2) if channels_last else flat.view(n, c_out, ho, wo))
    if residual is not None:
        out.add_(residual)
    return out.relu_() if relu else out
