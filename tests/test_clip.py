"""torchfast.nn.utils clipping against torch.nn.utils, the clipping ops against their reference, and
clipping folded into the optimizers (max_grad_norm)."""
import math

import pytest
import torch

import torchfast
from torchfast.nn import utils as tfu
from torchfast.reference import clip as ref
from conftest import require_kernel, tol

SHAPES = [(1,), (97,), (1025,), (33, 65), (4, 3, 5, 5), (40001,)]
NORM_TYPES = [2.0, 1.0, math.inf, 3.0]  # 3.0 runs through the reference
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make_params(dtype, device, shapes=SHAPES, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=g).to(dtype=dtype, device=device).requires_grad_()
        p.grad = (torch.randn(s, generator=g) * scale).to(dtype=dtype, device=device)
        params.append(p)
    return params


def clone(params):
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_()
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def norm_tol(dtype):
    # ours accumulates in fp32 (double across chunks), torch per tensor in the dtype: the norms agree
    # to the dtype's rounding, fp32 to ~1e-6 relative
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "no-clip"])
def test_clip_grad_norm_matches_torch(dtype, norm_type, max_norm, device):
    ours = make_params(dtype, device)
    theirs = clone(ours)
    n1 = tfu.clip_grad_norm_(ours, max_norm, norm_type)
    n2 = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    assert n1.dtype == n2.dtype and n1.device == n2.device and n1.shape == n2.shape
    torch.testing.assert_close(n1, n2, **norm_tol(dtype))
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, **tol(dtype))
    if max_norm == 1e6:
        for p, q in zip(ours, theirs):
            assert torch.equal(p.grad, q.grad), "nothing clipped: grads must be untouched"


def test_generator_none_grads_and_single_tensor():
    params = make_params(torch.float32, "cpu", shapes=[(10,), (11,), (12,)])
    params[1].grad = None
    theirs = clone(params)
    n1 = tfu.clip_grad_norm_((p for p in params), 0.1)
    n2 = torch.nn.utils.clip_grad_norm_(theirs, 0.1)
    torch.testing.assert_close(n1, n2)
    assert params[1].grad is None
    single = make_params(torch.float32, "cpu", shapes=[(7,)])
    single_ref = clone(single)
    torch.testing.assert_close(tfu.clip_grad_norm_(single[0], 0.1),
                               torch.nn.utils.clip_grad_norm_(single_ref[0], 0.1))
    torch.testing.assert_close(single[0].grad, single_ref[0].grad)


def test_empty_inputs():
    assert float(tfu.clip_grad_norm_([], 1.0)) == 0.0
    no_grad = [torch.zeros(3, requires_grad=True)]
    assert float(tfu.clip_grad_norm_(no_grad, 1.0)) == 0.0
    assert float(tfu.get_total_norm([])) == 0.0
    with pytest.warns(UserWarning, match="empty generator"):
        tfu.clip_grad_norm_((p for p in []), 1.0)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf], ids=str)
def test_empty_tensors_count_as_nothing(norm_type, device):
    """The inf-norm of nothing is 0, not an error (torch's foreach path raises on empty tensors)."""
    params = make_params(torch.float32, device, shapes=[(0,), (5,), (0, 3)])
    expected = torch.linalg.vector_norm(params[1].grad, norm_type)
    torch.testing.assert_close(tfu.clip_grad_norm_(params, 1e6, norm_type), expected)
    only_empty = make_params(torch.float32, device, shapes=[(0,)])
    assert float(tfu.clip_grad_norm_(only_empty, 1.0, norm_type)) == 0.0


def test_non_contiguous_grads(device):
    ours = make_params(torch.float32, device, shapes=[(30, 20), (16, 9)])
    for p in ours:
        p.grad = p.grad.t().contiguous().t()  # same values, transposed memory
    theirs = clone(ours)
    for p, q in zip(ours, theirs):
        q.grad = p.grad.clone()
    torch.testing.assert_close(tfu.clip_grad_norm_(ours, 0.3), torch.nn.utils.clip_grad_norm_(theirs, 0.3))
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, **tol(torch.float32))
        assert p.grad.stride() == q.grad.stride()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_non_finite_policy(bad, device):
    ours = make_params(torch.float32, device, shapes=[(5,), (6,)])
    ours[1].grad[2] = bad
    theirs = clone(ours)
    with pytest.raises(RuntimeError, match="non-finite"):
        tfu.clip_grad_norm_(clone(ours), 1.0, error_if_nonfinite=True)
    n1 = tfu.clip_grad_norm_(ours, 1.0)
    n2 = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    torch.testing.assert_close(n1, n2, equal_nan=True)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)


def test_get_total_norm_and_clip_grads_with_norm(device):
    ours = make_params(torch.float32, device)
    theirs = clone(ours)
    n1 = tfu.get_total_norm([p.grad for p in ours], 2.0)
    n2 = torch.nn.utils.get_total_norm([q.grad for q in theirs], 2.0)
    torch.testing.assert_close(n1, n2, **norm_tol(torch.float32))
    tfu.clip_grads_with_norm_(ours, 1.0, n2)
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, n2)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, **tol(torch.float32))


def test_clip_grad_value_matches_torch():
    ours = make_params(torch.float32, "cpu")
    theirs = clone(ours)
    tfu.clip_grad_value_(ours, 0.5)
    torch.nn.utils.clip_grad_value_(theirs, 0.5)
    for p, q in zip(ours, theirs):
        assert torch.equal(p.grad, q.grad)


# ---- the ops against the reference ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf], ids=str)
def test_total_norm_kernel_matches_reference(dtype, norm_type, device):
    require_kernel("total_norm", device)
    tensors = [p.grad for p in make_params(dtype, device)] + [torch.zeros(0, dtype=dtype, device=device)]
    got = torch.ops.torchfast.total_norm(tensors, norm_type)
    want = ref.total_norm(tensors, norm_type)
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got, want, **norm_tol(dtype))
    as_f32 = torch.ops.torchfast.total_norm(tensors, norm_type, torch.float32)
    assert as_f32.dtype == torch.float32
    torch.testing.assert_close(as_f32, ref.total_norm(tensors, norm_type, torch.float32),
                               rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=1e-5)


def test_total_norm_fp16_does_not_overflow_in_fp32():
    big = [torch.full((4096,), 60000.0, dtype=torch.float16)]
    assert torch.isinf(torch.ops.torchfast.total_norm(big, 2.0))  # torch's dtype rule: fp16 overflows
    torch.testing.assert_close(torch.ops.torchfast.total_norm(big, 2.0, torch.float32),
                               torch.tensor(60000.0 * 64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_value", [0.25, 40.0, float("inf"), float("nan")], ids=str)
def test_clip_kernel_matches_reference(dtype, norm_value, device):
    require_kernel("clip_grads_with_norm_", device)
    grads = [p.grad for p in make_params(dtype, device)]
    expected = [g.clone() for g in grads]
    norm = torch.tensor(norm_value, device=device)
    torch.ops.torchfast.clip_grads_with_norm_(grads, norm, 2.0)
    ref.clip_grads_with_norm_(expected, norm, 2.0)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, **tol(dtype), equal_nan=True)


def test_clip_ops_mixed_dtypes(device):
    require_kernel("total_norm", device)
    grads = [p.grad for p in make_params(torch.float32, device)] + \
            [p.grad for p in make_params(torch.bfloat16, device, seed=5)]
    torch.testing.assert_close(torch.ops.torchfast.total_norm(grads, 2.0), ref.total_norm(grads, 2.0))


def test_clip_ops_bad_input():
    require_kernel("total_norm", "cpu")
    with pytest.raises(RuntimeError, match="norm_type must be 1, 2 or inf, got 3"):
        torch.ops.torchfast.total_norm([torch.ones(3)], 3.0)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has dtype Int"):
        torch.ops.torchfast.total_norm([torch.ones(3), torch.ones(3, dtype=torch.int32)], 2.0)
    with pytest.raises(RuntimeError, match="total_norm must hold one value, got shape \\[2\\]"):
        torch.ops.torchfast.clip_grads_with_norm_([torch.ones(3)], torch.ones(2), 1.0)


def test_sparse_grads_take_the_reference_path():
    ours = [torch.zeros(4, 3, requires_grad=True), torch.zeros(5, requires_grad=True)]
    ours[0].grad = torch.randn(4, 3).to_sparse()
    ours[1].grad = torch.randn(5)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    for p, q in zip(ours, theirs):
        q.grad = p.grad.clone()
    torch.testing.assert_close(tfu.clip_grad_norm_(ours, 0.5), torch.nn.utils.clip_grad_norm_(theirs, 0.5))
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad.to_dense(), q.grad.to_dense())


@pytest.mark.parametrize("op", ["total_norm", "clip_grads_with_norm_"])
def test_opcheck(op, device):
    require_kernel(op, device)
    grads = [p.grad for p in make_params(torch.float32, device)]
    if op == "total_norm":
        torch.library.opcheck(torch.ops.torchfast.total_norm.default, (grads, 2.0))
        torch.library.opcheck(torch.ops.torchfast.total_norm.default, (grads, math.inf, torch.float64))
    else:
        torch.library.opcheck(torch.ops.torchfast.clip_grads_with_norm_.default,
                              (grads, torch.tensor(30.0, device=device), 1.0))


def test_torch_compile_fullgraph(device):
    require_kernel("total_norm", device)
    grads = [p.grad for p in make_params(torch.float32, device)]
    expected = [g.clone() for g in grads]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def clip(gs):
        norm = torchfast.ops.clip.total_norm(gs, 2.0)
        torchfast.ops.clip.clip_grads_with_norm_(gs, norm, 1.0)
        return norm

    norm = clip(grads)
    want = ref.total_norm(expected, 2.0)
    ref.clip_grads_with_norm_(expected, want, 1.0)
    torch.testing.assert_close(norm, want, **norm_tol(torch.float32))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, **tol(torch.float32))


# ---- clipping folded into the optimizers ---------------------------------------------------------


@pytest.mark.parametrize("name,options", [("Adam", {}), ("AdamW", {"amsgrad": True}),
                                          ("SGD", {"momentum": 0.9, "nesterov": True}), ("SGD", {})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_max_grad_norm_equals_clip_then_step(name, options, dtype, device):
    ours = make_params(dtype, device)
    theirs = clone(ours)
    opt = getattr(torchfast.optim, name)(ours, lr=0.01, max_grad_norm=1.0, **options)
    ref_opt = getattr(torch.optim, name)(theirs, lr=0.01, foreach=False, **options)
    g = torch.Generator().manual_seed(7)
    for step in range(12):
        scale = 0.001 if step % 3 == 0 else 1.0  # some steps under max_grad_norm, most above
        for p, q in zip(ours, theirs):
            grad = (torch.randn(p.shape, generator=g) * scale).to(dtype=dtype, device=device)
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        ref_opt.step()
        torch.testing.assert_close(opt.last_grad_norm, norm.float(), **norm_tol(dtype))
    for p, q in zip(ours, theirs):
        if dtype == torch.float32:
            torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-6)
        else:  # torch's for-loop rounds each op to bf16, ours once
            torch.testing.assert_close(p, q, **tol(dtype))


def test_max_grad_norm_per_group_and_state_dict_keys():
    a, b = make_params(torch.float32, "cpu", shapes=[(50,)]), make_params(torch.float32, "cpu", shapes=[(60,)], seed=3)
    ra, rb = clone(a), clone(b)
    opt = torchfast.optim.Adam([{"params": a, "max_grad_norm": 0.1}, {"params": b}], lr=0.01)
    ref_opt = torch.optim.Adam([{"params": ra}, {"params": rb}], lr=0.01, foreach=False)
    opt.step()
    n = torch.nn.utils.clip_grad_norm_(ra, 0.1)
    ref_opt.step()
    assert opt.last_grad_norms[1] is None
    torch.testing.assert_close(opt.last_grad_norm, n)
    for p, q in zip(a + b, ra + rb):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-6)
    plain = torchfast.optim.Adam(make_params(torch.float32, "cpu"))
    assert "max_grad_norm" not in plain.param_groups[0]  # torch's keys unless asked for
    with pytest.raises(ValueError, match="Invalid max_grad_norm value: -1"):
        torchfast.optim.SGD(a, lr=0.1, max_grad_norm=-1)
