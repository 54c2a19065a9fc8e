"""The Python face of every compiled op family: one module per family."""
from torchfast.ops import optim  # noqa: F401
