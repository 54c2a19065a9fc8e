"""Ready-made networks built from torchfast's fused layers."""
from __future__ import annotations

from torch import Tensor, nn

from torchfast.nn.attention import MultiheadAttention
from torchfast.nn.layers import ResidualBlock
from torchfast.reference import modules as plain

__all__ = ["ComplexNetwork"]


class ComplexNetwork(plain.ComplexNetwork):
    """The cheat sheet's ComplexNetwork (conv features with a ResidualBlock, multi-head attention over
    the feature map, pooled classifier) with torchfast's fused ResidualBlock and flash-attention
    MultiheadAttention: the same module tree, so a state_dict of the cheat sheet's network loads
    unchanged. in_channels generalises its 3."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        nn.Module.__init__(self)
        self.features = plain.complex_network_features(in_channels, ResidualBlock(64))
        self.classifier = plain.complex_network_classifier(num_classes)
        self.attention = MultiheadAttention(128, 8)

    def _attend(self, x_attn: Tensor) -> Tensor:
        # The cheat sheet discards the weights, so skip building them (the flash path).
        return self.attention(x_attn, x_attn, x_attn, need_weights=False)[0]
