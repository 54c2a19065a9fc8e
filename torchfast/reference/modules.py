"""The cheat sheet's modules in plain PyTorch, as users write them today: the baseline that
torchfast's fused layers are tested and benchmarked against (state_dicts load both ways)."""
from __future__ import annotations

from torch import Tensor, nn


class ResidualBlock(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> + input -> ReLU (the cheat sheet's block, verbatim)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += residual
        return self.relu(out)


def complex_network_features(in_channels: int, block: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), block,
                         nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))


def complex_network_classifier(num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(128, 256), nn.Dropout(0.5), nn.ReLU(),
                         nn.Linear(256, num_classes))


class ComplexNetwork(nn.Module):
    """The cheat sheet's ComplexNetwork (in_channels generalises its 3)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.features = complex_network_features(in_channels, ResidualBlock(64))
        self.classifier = complex_network_classifier(num_classes)
        self.attention = nn.MultiheadAttention(128, 8)

    def _attend(self, x_attn: Tensor) -> Tensor:
        attn_out, _ = self.attention(x_attn, x_attn, x_attn)
        return attn_out

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        b, c, h, w = x.shape
        x_attn = x.reshape(b, c, -1).permute(2, 0, 1)  # (h*w, b, c)
        attn_out = self._attend(x_attn)
        x = attn_out.permute(1, 2, 0).reshape(b, c, h, w)
        return self.classifier(x)
