"""Plain-PyTorch references of every torchfast op (the tests' oracle and the fallback path)."""
from torchfast.reference import clip, norm, optim  # noqa: F401
