"""Loads torchfast's compiled libraries once, and records which kernels are active per device.

Never raises: when the libraries are missing, were built against another torch, fail to load, or
TORCHFAST_DISABLE_KERNELS=1 is set, every op runs its pure-PyTorch reference, and (except for the
explicit switch) one warning says why and how to rebuild.
"""
from __future__ import annotations

import importlib.util
import json
import os
import warnings
from dataclasses import dataclass, field

import torch

# Every compiled op, by its name in the torchfast namespace.
OPS = ("fused_adam_", "fused_sgd_", "total_norm", "clip_grads_with_norm_", "bn_add_relu", "bn_add_relu_backward",
       "relu_max_pool2d", "relu_max_pool2d_backward", "flash_attention", "flash_attention_backward")

REBUILD_HINT = (
    "Rebuild against the installed torch with `pip install --no-build-isolation --force-reinstall .` "
    "from the torchfast source tree."
)


@dataclass
class LoadState:
    loaded: bool = False
    reason: str = "not loaded yet"
    build_info: dict = field(default_factory=dict)
    cpu_library: str | None = None
    module: object = None  # torchfast._C imported as a Python module (eager entry points)
    # op name -> set of device types ("cpu", "cuda") with a compiled kernel
    kernels: dict = field(default_factory=dict)


STATE = LoadState()


def _library_path(module: str) -> str | None:
    spec = importlib.util.find_spec(f"torchfast.{module}")
    return spec.origin if spec is not None and spec.origin else None


def _read_build_info() -> dict:
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _cpu_library_for_this_machine(built: list[str]) -> str | None:
    """The CPU kernel library for the capability torch itself uses here (honours ATEN_CPU_CAPABILITY)."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    order = {"avx512": ["avx512", "avx2", "default"], "avx2": ["avx2", "default"]}.get(capability, ["default"])
    for isa in order:
        if isa in built:
            return f"_cpu_{isa}"
    return None


def _why_not_loadable(info: dict) -> str | None:
    if os.environ.get("TORCHFAST_DISABLE_KERNELS", "0") not in ("", "0"):
        return "TORCHFAST_DISABLE_KERNELS is set"
    if not info or _library_path("_C") is None:
        return "the compiled library is missing (torchfast was not built)"
    if info.get("torch_version") != torch.__version__:
        return (f"it was built against torch {info.get('torch_version')} but torch {torch.__version__} "
                "is running")
    if info.get("cuda") and torch.version.cuda is None:
        return f"it was built with CUDA but torch {torch.__version__} is a CPU-only build"
    return None


def _active_kernels() -> dict:
    kernels = {}
    for op in OPS:
        devices = set()
        for key, device in (("CPU", "cpu"), ("CUDA", "cuda")):
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"torchfast::{op}", key):
                devices.add(device)
        kernels[op] = devices
    return kernels


def load() -> LoadState:
    if STATE.loaded or STATE.reason != "not loaded yet":
        return STATE
    info = _read_build_info()
    STATE.build_info = info
    reason = _why_not_loadable(info)
    if reason is None:
        try:
            torch.ops.load_library(_library_path("_C"))
            cpu_lib = _cpu_library_for_this_machine(info.get("cpu_isas", []))
            if cpu_lib is not None:
                torch.ops.load_library(_library_path(cpu_lib))
            STATE.cpu_library = cpu_lib
            if cpu_lib is None:
                warnings.warn(f"torchfast: no CPU kernel library was built for this CPU "
                              f"({torch.backends.cpu.get_cpu_capability()}); CPU ops use the reference. "
                              f"{REBUILD_HINT}", RuntimeWarning, stacklevel=3)
            STATE.kernels = _active_kernels()
            STATE.module = importlib.import_module("torchfast._C")
            STATE.loaded = True
            STATE.reason = "loaded"
        except Exception as e:  # a broken build must never break `import torchfast`
            reason = f"loading it failed ({type(e).__name__}: {e})"
    if not STATE.loaded:
        STATE.reason = reason
        STATE.kernels = {op: set() for op in OPS}
        if reason != "TORCHFAST_DISABLE_KERNELS is set":
            warnings.warn(f"torchfast: using the pure-PyTorch reference ops because {reason}. {REBUILD_HINT}",
                          RuntimeWarning, stacklevel=3)
    return STATE


def has_kernel(op: str, device_type: str) -> bool:
    return device_type in STATE.kernels.get(op, ())
