"""Plain-PyTorch references of every torchfast op (the tests' oracle and the fallback path)."""
from torchfast.reference import clip, optim  # noqa: F401
