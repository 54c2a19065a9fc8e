"""The networks `torchfast train --model` trains: the cheat sheet's ComplexNetwork and torchvision's
ResNet-18, each as plain torch (`--eager`) or with torchfast's fused layers."""
from __future__ import annotations

from torch import nn

ARCHITECTURES = ("complexnet", "resnet18")


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, fused: bool) -> nn.Module:
    """The network `name` for in_channels x image_size x image_size inputs and num_classes outputs.

    resnet18 is torchvision's (random init); below 64x64 pixels it takes the small-image stem that
    CIFAR-sized training uses (a 3x3 stride-1 first convolution, no max pool: the 7x7 stride-2 stem and
    pool would leave a 32x32 image 8x8 before the first block), and any in_channels. fused=True converts
    it with torchfast.convert (state_dict unchanged, so a checkpoint loads either way)."""
    if name == "complexnet":
        if fused:
            import torchfast
            return torchfast.models.ComplexNetwork(num_classes=num_classes, in_channels=in_channels)
        from torchfast.reference.modules import ComplexNetwork
        return ComplexNetwork(num_classes=num_classes, in_channels=in_channels)
    if name == "resnet18":
        try:
            from torchvision.models import resnet18
        except ImportError as e:
            raise RuntimeError("--model resnet18 is torchvision's: pip install torchvision") from e
        model = resnet18(num_classes=num_classes)
        if image_size < 64:
            model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        if fused:
            import torchfast
            model = torchfast.convert(model, inplace=True)
        return model
    raise ValueError(f"unknown model {name!r}; choose from {ARCHITECTURES}")


def infer_shape(name: str, weights: dict) -> tuple[int, int]:
    """(in_channels, num_classes) of a `name` network from its state_dict."""
    if name == "complexnet":
        return weights["features.0.weight"].shape[1], weights["classifier.5.weight"].shape[0]
    if name == "resnet18":
        return weights["conv1.weight"].shape[1], weights["fc.weight"].shape[0]
    raise ValueError(f"unknown model {name!r}; choose from {ARCHITECTURES}")
