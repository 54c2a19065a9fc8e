"""Shared test set-up: devices, per-dtype tolerances, and helpers."""
import pytest
import torch

import torchfast

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Per-dtype tolerances (rtol, atol), one place for every test.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def pytest_report_header(config):
    info = torchfast.info()
    return [f"torchfast from {torchfast.__file__}: {info['status']}; kernels {info['kernels']}"]


def pytest_sessionstart(session):
    # CI sets this: a test run that silently fell back to the reference path proves nothing.
    import os
    if os.environ.get("TORCHFAST_REQUIRE_KERNELS") == "1" and not torchfast.info()["kernels_loaded"]:
        raise pytest.UsageError(f"TORCHFAST_REQUIRE_KERNELS=1 but the kernels are not loaded: "
                                f"{torchfast.info()['status']} (torchfast imported from {torchfast.__file__})")
    if os.environ.get("TORCHFAST_REQUIRE_EMULATOR") == "1":
        _load_emulator()  # raises a UsageError naming why it is missing


def tol(dtype):
    rtol, atol = TOL[dtype]
    return {"rtol": rtol, "atol": atol}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def kernels_built(op: str, device: str) -> bool:
    return torchfast._loader.has_kernel(op, device)


def require_kernel(op: str, device: str):
    """Skip (with the reason) when no compiled kernel serves this op on this device."""
    if not kernels_built(op, device):
        pytest.skip(f"no compiled {op} kernel for {device}: {torchfast._loader.STATE.reason}")


# ---- the CUDA emulator (csrc/emulator/): the CUDA kernels on CPU tensors ----------------------
# Every emulated test runs under four schedules: a missing barrier shows as a wrong result under at
# least one of them (ascending lets low threads read before high ones wrote, descending the reverse,
# random mixes them; warps-descending lets each warp run ahead of the others up to __syncthreads).
SCHEDULES = [("ascending", 0), ("descending", 0), ("random", 1), ("warps-descending", 0)]


def _load_emulator():
    import os
    try:
        from torchfast.testing import cuda_emulator
        return cuda_emulator, None
    except ImportError as e:
        if os.environ.get("TORCHFAST_REQUIRE_EMULATOR") == "1":
            raise pytest.UsageError(f"TORCHFAST_REQUIRE_EMULATOR=1 but the CUDA emulator is unavailable: {e}")
        return None, str(e)


@pytest.fixture(scope="session")
def emu():
    """torchfast.testing.cuda_emulator (skips where it was not built; CI requires it)."""
    module, why = _load_emulator()
    if module is None:
        pytest.skip(why)
    return module


def _schedule_id(s):
    return f"{s[0]}{s[1]}" if s[0] == "random" else s[0]


@pytest.fixture(params=SCHEDULES, ids=_schedule_id)
def schedule(request, emu):
    with emu.schedule(*request.param):
        yield request.param

