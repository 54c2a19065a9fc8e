"""Drop-in layers (torchfast.nn) and utilities (torchfast.nn.utils: gradient clipping)."""
from torchfast.nn import utils  # noqa: F401
