"""The Python face of every compiled op family: one module per family."""
from torchfast.ops import clip, norm, optim  # noqa: F401
