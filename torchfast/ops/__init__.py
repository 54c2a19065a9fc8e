"""The Python face of every compiled op family: one module per family."""
from torchfast.ops import attention, clip, norm, optim, pool  # noqa: F401
