"""Ready-made networks built from torchfast's fused layers."""
from __future__ import annotations

from torch import Tensor, nn

from torchfast.nn.layers import ResidualBlock

__all__ = ["ComplexNetwork"]


class ComplexNetwork(nn.Module):
    """The cheat sheet's ComplexNetwork (conv features with a ResidualBlock, multi-head attention over
    the feature map, pooled classifier), with torchfast's fused ResidualBlock. Same module tree, so a
    state_dict of the cheat sheet's network loads unchanged. in_channels generalises its 3."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            ResidualBlock(64),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Flatten(),
            nn.Linear(128, 256),
            nn.Dropout(0.5),
            nn.ReLU(),
            nn.Linear(256, num_classes),
        )
        self.attention = nn.MultiheadAttention(128, 8)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        b, c, h, w = x.shape
        x_attn = x.reshape(b, c, -1).permute(2, 0, 1)  # (h*w, b, c)
        attn_out, _ = self.attention(x_attn, x_attn, x_attn)
        x = attn_out.permute(1, 2, 0).reshape(b, c, h, w)
        return self.classifier(x)
