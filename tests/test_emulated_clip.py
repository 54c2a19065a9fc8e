"""The CUDA kernels of total_norm / clip_grads_with_norm_, run by the CUDA emulator on CPU tensors,
against the references: norm types 2, 1 and inf, every dtype, tensors across chunk boundaries,
non-dense tensors, inf/NaN propagation, and clipping with a coefficient below and at 1."""
import math

import pytest
import torch

from torchfast.reference import clip as ref
from conftest import tol

CHUNK = 16384
SHAPES = [(0,), (1,), (97,), (2 * CHUNK + 5,), (33, 65)]


def _grads(dtype, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_total_norm_matches_reference(emu, schedule, norm_type, dtype):
    grads = _grads(dtype)
    grads[4] = grads[4].t()  # non-dense view: read through a contiguous copy
    mine = emu.ops.total_norm(grads, norm_type)
    theirs = ref.total_norm(grads, norm_type)
    assert mine.dtype == theirs.dtype == dtype and mine.dim() == 0
    # the truth in fp64; fp32 accumulation (both) is good to ~1e-6 of a sum of 3e4 terms
    truth = ref.total_norm([g.double() for g in grads], norm_type)
    acc_tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.double(), truth, **(acc_tol if dtype in (torch.float32, torch.float64)
                                                           else tol(dtype)))
    torch.testing.assert_close(mine, theirs, **(acc_tol if dtype == torch.float32 else tol(dtype)))
    as_f32 = emu.ops.total_norm(grads, norm_type, torch.float32)
    assert as_f32.dtype == torch.float32


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_total_norm_propagates_inf_and_nan(emu, schedule, norm_type):
    grads = _grads(torch.float32)
    grads[3][CHUNK + 7] = float("inf")
    assert emu.ops.total_norm(grads, norm_type).item() == math.inf
    grads[2][5] = float("nan")
    assert math.isnan(emu.ops.total_norm(grads, norm_type).item())


def test_mixed_dtypes_in_one_norm(emu, schedule):
    grads = _grads(torch.float32, shapes=[(97,), (CHUNK + 1,)]) + _grads(torch.bfloat16, 1, shapes=[(300,)])
    torch.testing.assert_close(emu.ops.total_norm(grads, 2.0, torch.float32),
                               ref.total_norm(grads, 2.0, torch.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("max_norm", [1.0, 1e6], ids=["clips", "coefficient-1"])
def test_clip_matches_reference(emu, schedule, max_norm, dtype):
    mine = _grads(dtype)
    misaligned = torch.empty(98, dtype=dtype)[1:].copy_(mine[2])  # scalar path of the chunk loop
    mine[2] = misaligned
    theirs = [g.clone() for g in mine]
    norm = ref.total_norm(mine, 2.0)
    emu.ops.clip_grads_with_norm_(mine, norm, max_norm)
    ref.clip_grads_with_norm_(theirs, norm, max_norm)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, **tol(dtype))
    if max_norm == 1.0:  # the clipped grads have norm max_norm
        torch.testing.assert_close(ref.total_norm(mine, 2.0).double(), torch.tensor(1.0, dtype=torch.float64),
                                   rtol=2e-2, atol=2e-2)


def test_clip_layouts_and_norm_dtypes(emu, schedule):
    """A non-dense grad (staged, clipped, written back), a transposed one, fp64 grads with an fp32
    norm and fp32 grads with an fp64 norm (the coefficient in the norm's precision, as on the CPU),
    a NaN norm."""
    base = torch.randn(40, 30, dtype=torch.float64)
    makers = {"transposed": lambda: base.float().t(), "fp64": lambda: base.clone(),
              "strided": lambda: base.float()[:, ::2]}  # not dense: staged
    for name, make in makers.items():
        for norm in (torch.tensor(3.0), torch.tensor(3.0, dtype=torch.float64), torch.tensor(float("nan"))):
            mine, theirs = [make()], [make()]
            emu.ops.clip_grads_with_norm_(mine, norm, 1.0)
            ref.clip_grads_with_norm_(theirs, norm, 1.0)
            assert mine[0].stride() == theirs[0].stride(), name
            torch.testing.assert_close(mine[0], theirs[0], rtol=1e-6, atol=1e-7, equal_nan=True, msg=name)
