"""Plain-PyTorch references of every torchfast op (the tests' oracle and the fallback path), and the
cheat sheet's modules in plain PyTorch (the baseline of the fused layers)."""
from torchfast.reference import clip, modules, norm, optim  # noqa: F401
