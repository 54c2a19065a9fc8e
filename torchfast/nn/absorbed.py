"""The ReLU a fused layer took over: what torchfast.convert leaves where the nn.ReLU was."""
from __future__ import annotations

from torch import nn

__all__ = ["AbsorbedReLU", "absorb_relu", "absorbed_relu", "release_relu"]

_FLAG = "_torchfast_absorbed_relu"


class AbsorbedReLU(nn.Identity):
    """An identity standing where an nn.ReLU was, whose ReLU the neighbouring fused layer
    (BatchNormReLU2d, ReLUMaxPool2d) now applies. It keeps the ReLU's `inplace`, so that
    torchfast.deploy.to_plain can put the nn.ReLU back (quantizers' fuse_modules and pattern matchers
    look for conv -> bn -> relu modules)."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


def absorb_relu(fused_layer: nn.Module, owner: nn.Module, name: str) -> None:
    """owner.<name> (an nn.ReLU) -> AbsorbedReLU; fused_layer is marked as the one applying it."""
    relu = getattr(owner, name)
    setattr(owner, name, AbsorbedReLU(relu.inplace).train(relu.training))
    fused_layer.__dict__[_FLAG] = True


def absorbed_relu(layer: nn.Module) -> bool:
    """Whether `layer` applies the ReLU of an AbsorbedReLU beside it."""
    return layer.__dict__.get(_FLAG, False)


def release_relu(layer: nn.Module) -> None:
    """Undoes absorb_relu's mark on `layer` (its AbsorbedReLU is an nn.ReLU again)."""
    layer.__dict__.pop(_FLAG, None)
