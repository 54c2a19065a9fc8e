"""Python face of the ReLU + max-pooling ops (csrc/pool): fake and autograd registrations, and the
function that runs the kernel or, where no kernel serves the call, the reference."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from torchfast import _loader
from torchfast.ops._registry import autograd_transforms_active, compiled_op, onnx_exporting, register_fake_if_compiled
from torchfast.reference import pool as ref

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _pooled_size(size, k: int, s: int, p: int):
    return (size + 2 * p - k) // s + 1


def _empty(shape, like: Tensor, dtype: torch.dtype, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=like.device, memory_format=fmt)


@register_fake_if_compiled("relu_max_pool2d")
def _relu_max_pool2d_fake(input, kernel_size, stride, padding, relu):
    torch._check(input.dim() == 4, lambda: f"torchfast.relu_max_pool2d: input must be (N, C, H, W), got {input.shape}")
    n, c, h, w = input.shape
    shape = (n, c, _pooled_size(h, kernel_size[0], stride[0], padding[0]),
             _pooled_size(w, kernel_size[1], stride[1], padding[1]))
    cl = ref.is_channels_last(input)
    return _empty(shape, input, input.dtype, cl), _empty(shape, input, torch.uint8, cl)


@register_fake_if_compiled("relu_max_pool2d_backward")
def _relu_max_pool2d_backward_fake(grad_out, out, argmax, input_size, kernel_size, stride, padding, relu,
                                   channels_last):
    return _empty(list(input_size), out, out.dtype, channels_last)


def _setup_context(ctx, inputs, output):
    input, kernel_size, stride, padding, relu = inputs
    out, argmax = output
    ctx.save_for_backward(out, argmax)
    ctx.conf = (list(input.shape), list(kernel_size), list(stride), list(padding), relu, ref.is_channels_last(input))
    ctx.mark_non_differentiable(argmax)


def _backward(ctx, grad_out, _grad_argmax):
    out, argmax = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    # create_graph=True: the reference's backward is made of differentiable torch ops (linear in
    # grad_out; the second derivative with respect to the input is zero almost everywhere)
    backward = ref.relu_max_pool2d_backward if torch.is_grad_enabled() else \
        torch.ops.torchfast.relu_max_pool2d_backward
    return backward(grad_out, out, argmax, *ctx.conf), None, None, None, None


if _loader.STATE.loaded:
    try:
        torch.library.register_autograd("torchfast::relu_max_pool2d", _backward, setup_context=_setup_context)
    except (RuntimeError, AttributeError):  # schema absent in a partial build
        pass


def kernel_serves(input: Tensor) -> bool:
    """Whether the compiled kernel handles this call (else the reference does). ONNX exports get the
    reference's standard ops (MaxPool, Relu), which every runtime and quantizer knows."""
    device = input.device.type
    return (not onnx_exporting() and not autograd_transforms_active() and input.dim() == 4
            and input.dtype in DTYPES and _loader.has_kernel("relu_max_pool2d", device)
            and _loader.has_kernel("relu_max_pool2d_backward", device))


def fused_pays(input: Tensor) -> bool:
    """Whether relu_max_pool2d's kernel is the faster way to pool this input: on CUDA; on the CPU for
    channels_last inputs (measured 0.67x eager forward + backward, 0.88x forward, batch 32 x 64
    channels at 32x32) and for NCHW fp32/fp64 ones, whose forward is vectorised over output columns
    (measured on ResNet's stem pool, batch 16 x 64 channels at 32x32, 3x3 / 2: forward 1.15 ms against
    torch's 5.1 ms, forward + backward 4.1 ms against torch's ReLU + pool 7.4 ms). NCHW fp16/bf16 on
    the CPU take the kernel's scalar loop, which measured slower than torch's ops: callers run those."""
    if not kernel_serves(input):
        return False
    return input.device.type != "cpu" or ref.is_channels_last(input) or input.dtype in (torch.float32,
                                                                                        torch.float64)


def relu_max_pool2d(input: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                    relu: bool) -> tuple[Tensor, Tensor]:
    """(relu?(max_pool2d(input)), argmax) for a 4-D input; see csrc/torchfast.cpp."""
    args = (list(kernel_size), list(stride), list(padding), bool(relu))
    if kernel_serves(input):
        return compiled_op("relu_max_pool2d")(input, *args)
    return ref.relu_max_pool2d(input, *args)


def relu_max_pool2d_backward(grad_out: Tensor, out: Tensor, argmax: Tensor, input_size: Sequence[int],
                             kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], relu: bool,
                             channels_last: bool) -> Tensor:
    """The input gradient of relu_max_pool2d (for callers with their own autograd, e.g. a fused
    conv -> ReLU -> pool)."""
    args = (list(input_size), list(kernel_size), list(stride), list(padding), bool(relu), bool(channels_last))
    if kernel_serves(out):
        return compiled_op("relu_max_pool2d_backward")(grad_out, out, argmax, *args)
    return ref.relu_max_pool2d_backward(grad_out, out, argmax, *args)
