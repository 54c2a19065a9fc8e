"""torchfast: fused C++/CUDA kernels for everyday PyTorch training.

Importing torchfast loads its compiled kernels once. If they are missing or were built against
another torch, import still succeeds: every op runs its pure-PyTorch reference and one warning says
why. TORCHFAST_DISABLE_KERNELS=1 forces the reference path.
"""
from torchfast import _loader

__version__ = "0.1.0"

_loader.load()

from torchfast import models, nn, ops, optim, reference  # noqa: E402,F401  (registrations need the library loaded)
from torchfast.convert import ConversionReport, convert, enable  # noqa: E402


def info() -> dict:
    """torch version, build configuration and the active kernels per device."""
    import torch

    state = _loader.STATE
    return {
        "torchfast": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernels_loaded": state.loaded,
        "status": state.reason,
        "cpu_library": state.cpu_library,
        "build": state.build_info,
        "kernels": {op: sorted(devices) for op, devices in state.kernels.items()},
    }


__all__ = ["ConversionReport", "convert", "enable", "info", "models", "nn", "ops", "optim", "reference",
           "__version__"]
