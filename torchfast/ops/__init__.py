"""The Python face of every compiled op family: one module per family."""
from torchfast.ops import clip, optim  # noqa: F401
