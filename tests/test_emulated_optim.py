"""The CUDA kernels of fused_adam_ / fused_sgd_, run by the CUDA emulator on CPU tensors, against the
references: every dtype, chunking across tensor boundaries and several chunks per tensor, the vector
path and its fallback (misaligned storage), staged non-contiguous tensors, mixed dtypes in one call,
lr_tensor, grad_scale, found_inf and clip_coef, under every emulated thread schedule."""
import pytest
import torch

from torchfast.reference import optim as ref
from conftest import tol

CHUNK = 16384  # csrc/common/multi_tensor_cuda.cuh: kCudaChunkElems
# empty, one element, odd, exactly one chunk, three chunks with a tail, a matrix
SHAPES = [(0,), (1,), (97,), (CHUNK,), (2 * CHUNK + 5,), (33, 65)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _tensors(shapes, dtype, seed, misaligned=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        t = torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
        if misaligned:  # the same values one element into a buffer: not 16-byte aligned
            buf = torch.empty(t.numel() + 1, dtype=dtype)
            t = buf[1:].view(s).copy_(t)
        out.append(t)
    return out


def _adam_state(shapes, dtype, misaligned=False, amsgrad=True):
    params = _tensors(shapes, dtype, 0, misaligned)
    grads = _tensors(shapes, dtype, 1, misaligned)
    exp_avgs = [torch.randn_like(p).mul_(0.1) for p in params]
    exp_avg_sqs = [torch.rand_like(p).mul_(0.01) for p in params]
    max_sqs = [torch.rand_like(p).mul_(0.02) for p in params] if amsgrad else []  # only with amsgrad
    steps = [torch.tensor(3.0) for _ in params]
    return [params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps]


def _clone(lists):
    return [[t.clone() for t in ts] for ts in lists]


# The CUDA and CPU kernels share their element math (csrc/optim/*_math.h, fp32 or fp64): they agree
# to about one unit in the last place of the dtype (FMA contraction differs).
ONE_ULP = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-14, atol=1e-14),
           torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


def _assert_lists_close(a_lists, b_lists, dtype, tolerance=None):
    for a_list, b_list in zip(a_lists, b_lists):
        for a, b in zip(a_list, b_list):
            torch.testing.assert_close(a, b, **(tolerance or tol(dtype)))


def _assert_lists_equal(a_lists, b_lists):
    for a_list, b_list in zip(a_lists, b_lists):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b)


ADAM_OPTIONS = [
    dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
         decoupled_weight_decay=False),
    dict(lr=1e-2, beta1=0.8, beta2=0.95, weight_decay=0.05, eps=1e-6, amsgrad=True, maximize=True,
         decoupled_weight_decay=False),
    dict(lr=3e-3, beta1=0.3, beta2=0.99, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False,
         decoupled_weight_decay=True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", range(len(ADAM_OPTIONS)))
def test_adam_matches_reference(emu, schedule, opt, dtype):
    options = ADAM_OPTIONS[opt]
    mine = _adam_state(SHAPES, dtype, amsgrad=options["amsgrad"])
    theirs, cpu = _clone(mine), _clone(mine)
    for _ in range(2):
        emu.ops.fused_adam_(*mine, **options)
        ref.fused_adam_(*theirs, **options)
        torch.ops.torchfast.fused_adam_(*cpu, **options)
    _assert_lists_close(mine, theirs, dtype)
    _assert_lists_close(mine, cpu, dtype, ONE_ULP[dtype])
    assert all(s.item() == 5.0 for s in mine[5])


def _misalign(t):
    """The same values one element into a buffer: not 16-byte aligned."""
    return torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape).copy_(t)


@pytest.mark.parametrize("misaligned", ["none", "all", "one-state"])
def test_adam_device_scalars_and_layouts(emu, schedule, misaligned):
    """lr_tensor, grad_scale (grads unscaled in place), clip_coef, found_inf = 0 (the step runs), a
    non-contiguous grad (staged) and misaligned storage (the scalar path of the chunk loop), of every
    stream or of one state tensor only."""
    options = dict(ADAM_OPTIONS[1])
    mine = _adam_state(SHAPES, torch.float32, misaligned == "all")
    if misaligned == "one-state":
        mine[4] = [_misalign(t) for t in mine[4]]  # max_exp_avg_sqs only
    mine[1][5] = mine[1][5].t().contiguous().t()  # same values, transposed memory
    theirs = _clone(mine)
    extra = dict(lr_tensor=torch.tensor(0.02), grad_scale=torch.tensor(4.0), clip_coef=torch.tensor(0.5),
                 found_inf=torch.tensor(0.0))
    emu.ops.fused_adam_(*mine, **options, **extra)
    ref.fused_adam_(*theirs, **options, **extra)
    _assert_lists_close(mine, theirs, torch.float32)


def test_adam_found_inf_skips_everything(emu, schedule):
    mine = _adam_state(SHAPES, torch.float32, amsgrad=False)
    before = _clone(mine)
    emu.ops.fused_adam_(*mine, **ADAM_OPTIONS[0], grad_scale=torch.tensor(2.0), found_inf=torch.tensor(1.0))
    _assert_lists_equal(mine, before)


def test_adam_mixed_dtypes_in_one_call(emu, schedule):
    """fp32, bf16 and fp64 parameters in one call: one launch per dtype, each against the reference."""
    lists = [_adam_state([s], dt, amsgrad=False) for s, dt in (((97,), torch.float32), ((CHUNK + 3,), torch.bfloat16),
                                                 ((5, 7), torch.float64))]
    mine = [sum((l[i] for l in lists), []) for i in range(6)]
    theirs = _clone(mine)
    emu.ops.fused_adam_(*mine, **ADAM_OPTIONS[2])
    ref.fused_adam_(*theirs, **ADAM_OPTIONS[2])
    for a_list, b_list in zip(mine, theirs):
        for a, b in zip(a_list, b_list):
            torch.testing.assert_close(a, b, **tol(a.dtype))


SGD_OPTIONS = [
    dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01, nesterov=False, maximize=True),
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=False),
]


def _sgd_state(shapes, dtype, momentum, misaligned=False):
    params = _tensors(shapes, dtype, 0, misaligned)
    grads = _tensors(shapes, dtype, 1, misaligned)
    bufs = [torch.zeros_like(p) for p in params] if momentum else []
    return [params, grads, bufs]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", range(len(SGD_OPTIONS)))
def test_sgd_matches_reference(emu, schedule, opt, dtype):
    options = SGD_OPTIONS[opt]
    mine = _sgd_state(SHAPES, dtype, options["momentum"])
    theirs, cpu = _clone(mine), _clone(mine)
    for first in (True, False):
        emu.ops.fused_sgd_(*mine, **options, is_first_step=first)
        ref.fused_sgd_(*theirs, **options, is_first_step=first)
        torch.ops.torchfast.fused_sgd_(*cpu, **options, is_first_step=first)
    _assert_lists_close(mine, theirs, dtype)
    _assert_lists_close(mine, cpu, dtype, ONE_ULP[dtype])


@pytest.mark.parametrize("misaligned", ["none", "all", "one-grad"])
def test_sgd_device_scalars(emu, schedule, misaligned):
    options = SGD_OPTIONS[1]
    mine = _sgd_state(SHAPES, torch.float16, True, misaligned == "all")
    if misaligned == "one-grad":
        mine[1] = [_misalign(t) for t in mine[1]]
    theirs = _clone(mine)
    extra = dict(lr_tensor=torch.tensor(0.07), grad_scale=torch.tensor(8.0), clip_coef=torch.tensor(0.25),
                 found_inf=torch.tensor(0.0))
    emu.ops.fused_sgd_(*mine, **options, is_first_step=True, **extra)
    ref.fused_sgd_(*theirs, **options, is_first_step=True, **extra)
    _assert_lists_close(mine, theirs, torch.float16)
    skipped = _clone(mine)
    emu.ops.fused_sgd_(*mine, **options, is_first_step=False, found_inf=torch.tensor(1.0))
    _assert_lists_equal(mine, skipped)
