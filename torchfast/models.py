"""Ready-made networks built from torchfast's fused layers."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from torchfast.nn import fusion
from torchfast.nn.attention import MultiheadAttention
from torchfast.nn.layers import ResidualBlock, plain_path_needed
from torchfast.ops._registry import exporting
from torchfast.reference import modules as plain

__all__ = ["ComplexNetwork"]


def channels_last_pays(x: Tensor) -> bool:
    """Whether a network of convolutions should run this input in channels_last: on the CPU, for
    fp32/bf16 4-D inputs, in training and in inference alike (oneDNN's convolutions, their backward
    and max pooling are faster so; measured: benchmarks/RESULTS.md, whole-model speed)."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.bfloat16)
            and not exporting())


class ComplexNetwork(plain.ComplexNetwork):
    """The cheat sheet's ComplexNetwork (conv features with a ResidualBlock, multi-head attention over
    the feature map, pooled classifier) with torchfast's fused ResidualBlock and flash-attention
    MultiheadAttention: the same module tree, so a state_dict of the cheat sheet's network loads
    unchanged. in_channels generalises its 3.

    Whole-model layout plan: on the CPU the input is converted to channels_last once, and every
    layer keeps that layout (each conv -> ReLU -> pool fused, the ResidualBlock on channels_last, the
    attention reading the feature map through a view), so there is no conversion between layers.
    The result is the plain network's, to float rounding; with hooks on the features or under
    autocast the plain forward runs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        nn.Module.__init__(self)
        self.features = plain.complex_network_features(in_channels, ResidualBlock(64))
        self.classifier = plain.complex_network_classifier(num_classes)
        self.attention = MultiheadAttention(128, 8)
        self._weights_in_layout: dict = {}
        self._contiguous_weights = False  # set by torchfast.sharded.fully_shard: FSDP2 wants contiguous
        self._set_conv_weight_layout()

    def _set_conv_weight_layout(self) -> None:
        """Convolution weights in the layout of the device's plan: channels_last on the CPU (beside
        channels_last activations oneDNN would otherwise reorder each weight in every forward and
        backward, and the weight gradient back), contiguous elsewhere. Same values, same state_dict."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and isinstance(m._parameters.get("weight"), torch.Tensor):
                w = m._parameters["weight"]
                fmt = torch.channels_last if w.device.type == "cpu" and w.dim() == 4 else torch.contiguous_format
                if not w.is_contiguous(memory_format=fmt):
                    w.data = w.data.contiguous(memory_format=fmt)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._set_conv_weight_layout()  # .to(device) / .cuda() / .cpu(): the new device's layout
        return out

    def _attend(self, x_attn: Tensor) -> Tensor:
        # The cheat sheet discards the weights, so skip building them (the flash path).
        return self.attention(x_attn, x_attn, x_attn, need_weights=False)[0]

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type) or \
                plain_path_needed(self.features, [], x):
            return super().forward(x)
        layout = torch.channels_last if channels_last_pays(x) else None
        if layout is not None:
            x = x.contiguous(memory_format=layout)
        x = fusion.run_fused(self.features, x, self._weights_in_layout, layout)
        b, c, h, w = x.shape
        x_attn = x.reshape(b, c, h * w).permute(2, 0, 1)  # (h*w, b, c): a view of a channels_last map
        attn_out = self._attend(x_attn)
        x = attn_out.permute(1, 2, 0).reshape(b, c, h, w)
        return self.classifier(x)
