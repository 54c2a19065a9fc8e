"""The host-side CUDA emulator: torchfast's CUDA kernels, run on CPU tensors.

Built only with ``TORCHFAST_EMULATOR=1`` at install time (csrc/emulator/). Importing this module
loads ``torchfast/_emulator`` (or, with ``TORCHFAST_EMULATOR_LIBRARY=sanitized``, the ASan + UBSan
build ``torchfast/_emulator_sanitized``, which needs the sanitizer runtimes preloaded), after which
``torch.ops.torchfast_emu.<op>`` takes the same arguments as ``torch.ops.torchfast.<op>`` with CPU
tensors and runs the *CUDA* kernel of that op: the same ``.cu`` source, compiled by the host
compiler against a small CUDA execution model (fibers for threads, checked barriers, poisoned
shared memory, emulated WMMA). Raises ImportError, saying how to build it, when it is absent.

    from torchfast.testing import cuda_emulator as emu
    with emu.schedule("random", seed=3), emu.device("sm80"):
        out, lse = emu.ops.flash_attention(q, k, v, None, False, 0.125, 0.0, None)
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os

import torch

import torchfast  # noqa: F401  (loads torch and torchfast's own library first)

ORDERS = ("ascending", "descending", "random", "warps-ascending", "warps-descending")
DEVICES = ("sm75", "sm80", "sm86", "sm90")
BUILD_HINT = ("rebuild torchfast with the emulator: `TORCHFAST_EMULATOR=1 pip install .` (add "
              "TORCHFAST_EMULATOR_SANITIZERS=1 for the sanitized build), or "
              "`TORCHFAST_EMULATOR=1 python setup.py build_ext --inplace` in a source tree")


def _load() -> str:
    variant = os.environ.get("TORCHFAST_EMULATOR_LIBRARY", "plain")
    names = {"plain": "_emulator", "sanitized": "_emulator_sanitized"}
    if variant not in names:
        raise ImportError(f"TORCHFAST_EMULATOR_LIBRARY must be 'plain' or 'sanitized', got {variant!r}")
    spec = importlib.util.find_spec(f"torchfast.{names[variant]}")
    if spec is None or not spec.origin:
        raise ImportError(f"torchfast was built without the CUDA emulator (no torchfast.{names[variant]}); "
                          f"{BUILD_HINT}")
    try:
        torch.ops.load_library(spec.origin)
    except OSError as e:
        hint = (" The sanitized build needs its runtimes preloaded: see scripts/emulator_sanitized_tests.sh."
                if variant == "sanitized" else "")
        raise ImportError(f"loading the CUDA emulator {spec.origin} failed: {e}.{hint}") from e
    return spec.origin


LIBRARY = _load()
ops = torch.ops.torchfast_emu
_state = {"order": "ascending", "seed": 0, "device": "sm90"}


def set_schedule(order: str, seed: int = 0) -> None:
    """The order in which a block's threads (and its blocks) run: ascending, descending or random (a
    reproducible shuffle per block and round, from `seed`) run every ready thread between barrier
    releases, so warps advance together; warps-ascending / warps-descending run one warp at a time
    on through its warp collectives up to __syncthreads, so that a warp runs ahead of the others."""
    if order not in ORDERS:
        raise ValueError(f"schedule order must be one of {ORDERS}, got {order!r}")
    ops._emulator_set_schedule(order, int(seed))
    _state.update(order=order, seed=int(seed))


def set_device(arch: str) -> None:
    """The emulated GPU: its arch and shared-memory limits steer the kernels' host code (tensor-core
    paths need sm80+, the larger tiles need sm80's or sm90's shared memory)."""
    if arch not in DEVICES:
        raise ValueError(f"emulated device must be one of {DEVICES}, got {arch!r}")
    ops._emulator_set_device(arch)
    _state["device"] = arch


@contextlib.contextmanager
def schedule(order: str, seed: int = 0):
    saved = (_state["order"], _state["seed"])
    set_schedule(order, seed)
    try:
        yield
    finally:
        set_schedule(*saved)


@contextlib.contextmanager
def device(arch: str):
    saved = _state["device"]
    set_device(arch)
    try:
        yield
    finally:
        set_device(saved)


def launch_stats() -> dict:
    """{"<file>:<line> <kernel>": {"launches", "blocks", "threads"}} since the last reset."""
    return json.loads(ops._emulator_launch_stats())


def reset_launch_stats() -> None:
    ops._emulator_reset_launch_stats()


def sanitized() -> bool:
    """Whether the loaded emulator library is the ASan + UBSan build."""
    return bool(ops._emulator_sanitized())


def probe(name: str, fixed: bool) -> torch.Tensor:
    """Runs one of the emulator's self-test kernels (csrc/emulator/probes.cu)."""
    return ops._emulator_probe(name, fixed)
