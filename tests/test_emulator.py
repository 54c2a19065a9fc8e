"""The CUDA emulator itself (csrc/emulator/): on small kernels written for these tests
(csrc/emulator/probes.cu), it catches a missing __syncthreads, a missing __syncwarp after a WMMA
store, misaligned WMMA pointers, an over-limit dynamic or static shared-memory launch, an early
return before a barrier, divergent barriers, a deadlock, a half-warp shuffle and an oversized block;
the fixed kernels run clean. Both fiber back ends, the Python face and its errors."""
import os
import subprocess
import sys

import pytest
import torch

import torchfast
from conftest import SCHEDULES


def _ids(s):
    return f"{s[0]}{s[1]}" if s[0] == "random" else s[0]


SANITIZED = os.environ.get("TORCHFAST_EMULATOR_LIBRARY") == "sanitized"


UNWRITTEN = torch.full((32,), -7.0)  # the probes' output beyond the threads they launch
# Mistakes that show as wrong results (poisoned shared memory): caught under every schedule.
WRONG_RESULT_PROBES = {
    "missing_syncthreads": torch.arange(1, 65, dtype=torch.float32) % 64,
    "missing_syncwarp_after_wmma_store": torch.cat([torch.full((32,), 256.0), UNWRITTEN]),
    "missing_syncwarp": torch.cat([torch.arange(31, -1, -1, dtype=torch.float32), UNWRITTEN]),
}
# Mistakes the emulator reports, with what its message must say.
REPORTED_PROBES = {
    "wmma_misaligned": "not 256-bit",
    "dynamic_smem_over_limit": "more than the kernel's limit of 49152",
    "early_return_before_barrier": r"exited while 32 threads wait at __syncthreads at csrc/emulator/probes.cu:\d+",
    "divergent_barrier": "divergent __syncthreads",
    "deadlock": "deadlock",
    "half_warp_shuffle": "mask 0xffff: only full-warp masks",
    "static_smem_over_limit": "static shared memory to 53248 bytes",
    "oversized_block": r"block \(2048, 1, 1\)",
    "block_z_limit": r"block \(1, 1, 65\)",
    "grid_limit": r"grid \(1, 65536, 1\)",
    "divergent_shuffles": r"divergent warp collectives in warp \d: lane 0 at csrc/emulator/probes.cu:\d+",
    "exit_before_shuffle": "16 lanes exited while the others wait at the warp shuffle",
}
LAUNCH_ERRORS = ("dynamic_smem_over_limit", "oversized_block", "block_z_limit", "grid_limit")


@pytest.mark.parametrize("sched", SCHEDULES, ids=_ids)
@pytest.mark.parametrize("name", sorted(WRONG_RESULT_PROBES))
def test_missing_barrier_gives_a_wrong_result(emu, name, sched):
    with emu.schedule(*sched):
        torch.testing.assert_close(emu.probe(name, True), WRONG_RESULT_PROBES[name])
        assert not torch.equal(emu.probe(name, False), WRONG_RESULT_PROBES[name])


@pytest.mark.parametrize("name", sorted(REPORTED_PROBES))
def test_mistakes_are_reported(emu, schedule, name):
    emu.probe(name, True)  # the fixed kernel runs clean
    with pytest.raises(RuntimeError, match=REPORTED_PROBES[name]) as info:
        emu.probe(name, False)
    if name not in LAUNCH_ERRORS:  # launch errors name the launch site instead
        assert "in kernel `" in str(info.value) and "block (0, 0, 0)" in str(info.value)


def test_warp_running_ahead_shows_a_missing_syncthreads(emu):
    """A race between warps that a warp collective hides from the lockstep orders: the warp-serial
    schedules let one warp run ahead to its next __syncthreads and catch it."""
    t = torch.arange(64)
    expected = (2 * (((t ^ 1) + 32) % 64) + 100).float()
    for order in ("ascending", "descending", "random", "warps-ascending", "warps-descending"):
        with emu.schedule(order, 1):
            torch.testing.assert_close(emu.probe("warp_runs_ahead", True), expected)
    for order in ("warps-ascending", "warps-descending"):
        with emu.schedule(order):
            assert not torch.equal(emu.probe("warp_runs_ahead", False), expected), order


def test_shuffle_lanes_and_atomics(emu, schedule):
    torch.testing.assert_close(emu.probe("half_warp_shuffle", True), torch.full((64,), 496.0) +
                               torch.tensor([0.0] * 32 + [1024.0] * 32))
    t = torch.arange(64)
    expected = ((t % 32 + 3) % 32 + t // 32 * 32 + 1000 * t).float()  # index mod 32; xor 32: own value
    torch.testing.assert_close(emu.probe("shuffle_lanes", True), expected)
    assert emu.probe("atomic_add", True)[0].item() == 64 * 64
    assert torch.equal(emu.probe("atomic_add_returns_old", True), torch.ones(64))  # 64 distinct tickets


def test_shared_memory_against_the_device_limits(emu):
    with emu.device("sm75"):  # 64 KiB opt-in: 64 KiB of dynamic shared memory fits exactly
        assert emu.probe("dynamic_smem_over_limit", True)[0].item() == 16384
        emu.probe("dynamic_smem_over_optin", True)
        with pytest.raises(RuntimeError, match="exceed the device's opt-in limit of 65536"):
            emu.probe("dynamic_smem_over_optin", False)
        torch.testing.assert_close(emu.probe("static_plus_dynamic_over_optin", True), torch.full((64,), 3.0))
        with pytest.raises(RuntimeError, match="more than the device's opt-in limit of 65536"):
            emu.probe("static_plus_dynamic_over_optin", False)
    emu.probe("dynamic_smem_over_limit", True)
    emu.probe("dynamic_smem_over_optin", False)  # 80 KiB: within sm90's 227 KiB
    emu.probe("static_plus_dynamic_over_optin", False)


def test_launch_stats_count_launches_blocks_threads(emu):
    emu.reset_launch_stats()
    emu.probe("atomic_add", True)
    (key, stat), = emu.launch_stats().items()
    assert "atomic_kernel" in key and stat == {"launches": 1, "blocks": 64, "threads": 64 * 64}


def test_settings_errors(emu):
    with pytest.raises(ValueError, match="schedule order"):
        emu.set_schedule("sideways")
    with pytest.raises(ValueError, match="emulated device"):
        emu.set_device("sm70")
    with pytest.raises(RuntimeError, match="unknown device 'sm61'"):
        emu.ops._emulator_set_device("sm61")


def _run_python(code, **env):
    # the torchfast these tests import (installed or built in place), whatever the working directory holds
    where = os.path.dirname(os.path.dirname(torchfast.__file__))
    path = os.pathsep.join([where] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/",
                          env={**os.environ, "PYTHONPATH": path, **env})


def test_ucontext_fibers_give_the_same_results(emu):
    """The portable back end (TORCHFAST_EMULATOR_FIBERS=ucontext) against the assembly one: results,
    and a fault (a thread abandoned mid-kernel) followed by a clean launch."""
    code = ("import torch; from torchfast.testing import cuda_emulator as emu\n"
            "q = torch.randn(1, 2, 37, 32, generator=torch.Generator().manual_seed(0))\n"
            "o, l = emu.ops.flash_attention(q, q, q, None, True, 0.2, 0.0, None)\n"
            "try:\n    emu.probe('divergent_barrier', False)\nexcept RuntimeError as e:\n"
            "    assert 'divergent __syncthreads' in str(e)\n"
            "print(emu.probe('missing_syncthreads', True).sum().item(), o.double().sum().item())\n")
    outs = [_run_python(code, TORCHFAST_EMULATOR_FIBERS=b) for b in ("asm", "ucontext")]
    for r in outs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert outs[0].stdout == outs[1].stdout
    bad = _run_python(code, TORCHFAST_EMULATOR_FIBERS="threads")
    assert bad.returncode != 0 and "TORCHFAST_EMULATOR_FIBERS must be 'asm' or 'ucontext'" in bad.stderr


def test_missing_build_raises_import_error_with_the_build_command():
    r = _run_python("import torchfast.testing.cuda_emulator", TORCHFAST_EMULATOR_LIBRARY="nonesuch")
    assert r.returncode != 0 and "ImportError" in r.stderr and "must be 'plain' or 'sanitized'" in r.stderr
    code = ("import importlib.util, torchfast\n"
            "importlib.util.find_spec = lambda name, *a: None\n"
            "import torchfast.testing.cuda_emulator\n")
    r = _run_python(code)
    assert r.returncode != 0 and "TORCHFAST_EMULATOR=1 pip install ." in r.stderr


def test_the_requested_library_is_loaded(emu):
    assert emu.sanitized() == SANITIZED


@pytest.mark.skipif(not SANITIZED, reason="needs the sanitized emulator (scripts/emulator_sanitized_tests.sh)")
def test_address_sanitizer_sees_a_shared_memory_overflow(emu):
    """Shared memory is a heap buffer of exactly the declared size: one element past it is a
    heap-buffer-overflow report (in a child process: the report aborts it)."""
    emu.probe("shared_memory_overflow", True)
    code = ("from torchfast.testing import cuda_emulator as emu\n"
            "emu.probe('shared_memory_overflow', False)\n")
    r = _run_python(code)
    assert r.returncode != 0 and "heap-buffer-overflow" in r.stderr and "overflow_kernel" in r.stderr, \
        r.stderr[-3000:]
