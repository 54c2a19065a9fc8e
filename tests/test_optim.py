"""torchfast.optim (SGD, Adam, AdamW) against torch.optim, and the fused ops against their reference."""
import io

import pytest
import torch

import torchfast
from torchfast.reference import optim as ref
from conftest import require_kernel, tol

# Mixed shapes on purpose: empty, one element, odd sizes, a matrix, a conv weight.
SHAPES = [(0,), (1,), (97,), (1025,), (33, 65), (4, 3, 5, 5), (16385 + 7,)]
STEPS = 22

ADAM_OPTIONS = [
    {},
    {"weight_decay": 0.1},
    {"amsgrad": True},
    {"maximize": True},
    {"amsgrad": True, "weight_decay": 0.05, "maximize": True, "betas": (0.8, 0.95), "eps": 1e-6},
    {"betas": (0.3, 0.99)},  # 1 - beta1 >= 0.5: the other side of torch's lerp
]
SGD_OPTIONS = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.9, "dampening": 0.3},
    {"momentum": 0.8, "weight_decay": 0.01, "maximize": True},
    {"weight_decay": 0.1},
]
CASES = ([("Adam", o) for o in ADAM_OPTIONS] + [("AdamW", o) for o in ADAM_OPTIONS]
         + [("SGD", o) for o in SGD_OPTIONS])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_params(dtype, device, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype=dtype, device=device).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(step, *param_lists, non_contiguous=False):
    g = torch.Generator().manual_seed(1000 + step)
    for ps in zip(*param_lists):
        grad = torch.randn(ps[0].shape, generator=g)
        for p in ps:
            gp = grad.to(dtype=p.dtype, device=p.device)
            if non_contiguous and gp.dim() >= 2:
                # same values, transposed memory: exercises the staging path
                gp = gp.transpose(0, 1).contiguous().transpose(0, 1)
            elif non_contiguous and gp.dim() == 1 and gp.numel() > 1:
                gp = torch.stack([gp, gp], dim=1)[:, 0]  # stride 2
            p.grad = gp


def run_pair(name, options, dtype, device, steps=STEPS, non_contiguous=False, torch_kwargs=None):
    ours_p = make_params(dtype, device)
    ref_p = clone_params(ours_p)
    lr = 1e-2
    ours = getattr(torchfast.optim, name)(ours_p, lr=lr, **options)
    theirs = getattr(torch.optim, name)(ref_p, lr=lr, **options, **(torch_kwargs or {"foreach": False}))
    for step in range(steps):
        set_grads(step, ours_p, ref_p, non_contiguous=non_contiguous)
        ours.step()
        theirs.step()
    return ours_p, ref_p, ours, theirs


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_torch_for_loop(name, options, dtype, device):
    """Each optimizer x option x dtype against torch.optim's for-loop implementation over 20+ steps.

    fp32 agrees to rounding. fp16/bf16: torch's for-loop rounds after every op and ours once (fp32
    math), so both are held to an fp32 run of the same problem, ours to at most twice torch's error.
    """
    if dtype == torch.float16 and name.startswith("Adam") and "eps" not in options:
        # fp16 holds neither eps=1e-8 nor exp_avg_sq of small grads (they flush to 0): with the
        # default eps every fp16 Adam, torch's included, divides by ~0. Use an eps fp16 can carry.
        options = {**options, "eps": 1e-3}
    ours_p, ref_p, ours, theirs = run_pair(name, options, dtype, device)
    if dtype == torch.float32:
        for p, q in zip(ours_p, ref_p):
            torch.testing.assert_close(p, q, **tol(dtype))
        for p, q in zip(ours_p, ref_p):
            for key, value in theirs.state[q].items():
                torch.testing.assert_close(ours.state[p][key], value, **tol(dtype), msg=lambda m: f"{key}: {m}")
        return
    truth_p, _, _, _ = run_pair(name, options, torch.float32, device)
    for p, q, t in zip(ours_p, ref_p, truth_p):
        if p.numel() == 0:
            continue
        t = t.detach()
        err_ours = (p.detach().float() - t).abs().max().item()
        err_torch = (q.detach().float() - t).abs().max().item()
        slack = 2 * torch.finfo(dtype).eps * t.abs().max().item()
        assert err_ours <= 2 * err_torch + slack, (tuple(p.shape), err_ours, err_torch)


@pytest.mark.parametrize("name,options", [("Adam", {"amsgrad": True, "weight_decay": 0.1}),
                                          ("AdamW", {}), ("SGD", {"momentum": 0.9, "nesterov": True})])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_precision_matches_torch_fused(name, options, dtype):
    """fp16/bf16 with fp32 math and one rounding, as torch's fused CPU optimizers compute them."""
    ours_p, ref_p, _, _ = run_pair(name, options, dtype, "cpu", torch_kwargs={"fused": True})
    for p, q in zip(ours_p, ref_p):
        # one ulp of the dtype: the same math, rounding/FMA order aside
        torch.testing.assert_close(p, q, rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("name,options", [("Adam", {"amsgrad": True}), ("AdamW", {"weight_decay": 0.1}),
                                          ("SGD", {"momentum": 0.9})])
def test_non_contiguous_grads(name, options, device):
    ours_p, ref_p, _, _ = run_pair(name, options, torch.float32, device, non_contiguous=True)
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p, q, **tol(torch.float32))


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_non_contiguous_and_channels_last_params(name, device):
    base = torch.randn(6, 5, 3, 3, device=device)
    params = [base.to(memory_format=torch.channels_last).requires_grad_(),
              torch.randn(7, 9, device=device).t().requires_grad_()]  # a transposed leaf
    ref_p = [p.detach().clone(memory_format=torch.preserve_format).requires_grad_() for p in params]
    opts = {"momentum": 0.9} if name == "SGD" else {"weight_decay": 0.1}
    ours = getattr(torchfast.optim, name)(params, lr=0.05, **opts)
    theirs = getattr(torch.optim, name)(ref_p, lr=0.05, foreach=False, **opts)
    for step in range(5):
        set_grads(step, params, ref_p)
        ours.step()
        theirs.step()
    assert params[0].is_contiguous(memory_format=torch.channels_last)
    for p, q in zip(params, ref_p):
        torch.testing.assert_close(p, q, **tol(torch.float32))


def test_params_without_grad_are_skipped():
    params = make_params(torch.float32, "cpu", shapes=[(5,), (7,), (3,)])
    before = params[1].detach().clone()
    opt = torchfast.optim.Adam(params, lr=0.1)
    set_grads(0, params)
    params[1].grad = None
    opt.step()
    assert torch.equal(params[1], before)
    assert len(opt.state[params[1]]) == 0
    assert float(opt.state[params[0]]["step"]) == 1.0


def test_sgd_buffer_starts_when_a_param_first_gets_a_grad():
    """A param without a grad at the first step starts its momentum buffer later, as in torch."""
    ours_p = make_params(torch.float32, "cpu", shapes=[(11,), (13,)])
    ref_p = clone_params(ours_p)
    ours = torchfast.optim.SGD(ours_p, lr=0.1, momentum=0.9, dampening=0.2)
    theirs = torch.optim.SGD(ref_p, lr=0.1, momentum=0.9, dampening=0.2, foreach=False)
    for step in range(4):
        set_grads(step, ours_p, ref_p)
        if step == 0:
            ours_p[1].grad = ref_p[1].grad = None
        ours.step()
        theirs.step()
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p, q, **tol(torch.float32))


def test_param_groups_lr_tensor_and_closure():
    ours_p = make_params(torch.float32, "cpu", shapes=[(9,), (10,), (11,)])
    ref_p = clone_params(ours_p)

    def groups(ps):
        return [{"params": ps[:2], "lr": torch.tensor(0.02)}, {"params": ps[2:], "lr": 0.1, "weight_decay": 0.1}]

    ours = torchfast.optim.AdamW(groups(ours_p), lr=0.5)
    theirs = torch.optim.AdamW(groups(ref_p), lr=0.5, foreach=False)
    for step in range(6):
        set_grads(step, ours_p, ref_p)

        def closure():
            return torch.tensor(float(step))

        assert float(ours.step(closure)) == float(step)
        theirs.step()
        ours.param_groups[0]["lr"] = theirs.param_groups[0]["lr"] = torch.tensor(0.02 * (step + 2))
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p, q, **tol(torch.float32))


def test_works_with_lr_scheduler():
    ours_p = make_params(torch.float32, "cpu", shapes=[(31,)])
    ref_p = clone_params(ours_p)
    ours = torchfast.optim.SGD(ours_p, lr=0.1, momentum=0.9)
    theirs = torch.optim.SGD(ref_p, lr=0.1, momentum=0.9, foreach=False)
    s1 = torch.optim.lr_scheduler.OneCycleLR(ours, max_lr=0.5, total_steps=10)
    s2 = torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=0.5, total_steps=10)
    for step in range(10):
        set_grads(step, ours_p, ref_p)
        ours.step(); theirs.step(); s1.step(); s2.step()
    torch.testing.assert_close(ours_p[0], ref_p[0], **tol(torch.float32))


def test_param_groups_and_defaults_match_torch():
    for name in ["Adam", "AdamW", "SGD"]:
        p = [torch.zeros(3, requires_grad=True)]
        ours, theirs = getattr(torchfast.optim, name)(p), getattr(torch.optim, name)(p)
        assert ours.defaults == theirs.defaults, name
        assert ours.param_groups[0].keys() == theirs.param_groups[0].keys(), name


def _save_load(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name,options", [("Adam", {"amsgrad": True, "weight_decay": 0.1}),
                                          ("AdamW", {}), ("SGD", {"momentum": 0.9, "nesterov": True})])
@pytest.mark.parametrize("direction", ["torch->torchfast", "torchfast->torch"])
def test_state_dict_round_trip(name, options, direction, device):
    """A checkpoint written by one optimizer loads into the other and training continues identically."""
    first, second = ((torch.optim, torchfast.optim) if direction == "torch->torchfast"
                     else (torchfast.optim, torch.optim))
    kwargs = {"foreach": False} if first is torch.optim else {}
    straight = make_params(torch.float32, device)
    resumed = clone_params(straight)
    opt_straight = getattr(torch.optim, name)(straight, lr=0.01, foreach=False, **options)
    opt_a = getattr(first, name)(resumed, lr=0.01, **options, **kwargs)
    for step in range(STEPS):
        set_grads(step, straight, resumed)
        opt_straight.step()
        if step < STEPS // 2:
            opt_a.step()
            continue
        if step == STEPS // 2:
            checkpoint = _save_load(opt_a.state_dict())
            kwargs_b = {"foreach": False} if second is torch.optim else {}
            opt_b = getattr(second, name)(resumed, lr=0.5, **options, **kwargs_b)
            opt_b.load_state_dict(checkpoint)
            assert opt_b.param_groups[0]["lr"] == 0.01
        opt_b.step()
    for p, q in zip(resumed, straight):
        torch.testing.assert_close(p, q, **tol(torch.float32))
    # and the layout written back is torch's
    sd, sd_ref = opt_b.state_dict(), opt_straight.state_dict()
    assert sd["param_groups"][0].keys() == sd_ref["param_groups"][0].keys()
    for k in sd_ref["state"]:
        assert sd["state"][k].keys() == sd_ref["state"][k].keys()


# ---- the ops themselves, against the reference ---------------------------------------------------


def _adam_lists(dtype, device, amsgrad, seed=0):
    params = make_params(dtype, device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    grads = [torch.randn(p.shape, generator=g).to(dtype=dtype, device=device) for p in params]
    m = [torch.randn(p.shape, generator=g).to(dtype=dtype, device=device) * 0.1 for p in params]
    v = [torch.rand(p.shape, generator=g).to(dtype=dtype, device=device) * 0.1 for p in params]
    vmax = [x * 1.5 for x in v] if amsgrad else []
    steps = [torch.tensor(float(i % 5), device=device) for i in range(len(params))]
    return [p.detach() for p in params], grads, m, v, vmax, steps


def _clone_lists(lists):
    return [[t.clone() for t in lst] for lst in lists]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("amsgrad,decoupled,maximize", [(False, False, False), (True, True, True)])
@pytest.mark.parametrize("amp", ["none", "scale", "found_inf", "lr_tensor"])
def test_fused_adam_kernel_matches_reference(dtype, amsgrad, decoupled, maximize, amp, device):
    require_kernel("fused_adam_", device)
    lists = _adam_lists(dtype, device, amsgrad)
    expected = _clone_lists(lists)
    extra = {}
    if amp == "scale":
        extra = {"grad_scale": torch.tensor(1024.0, device=device), "found_inf": torch.tensor(0.0, device=device)}
    elif amp == "found_inf":
        extra = {"grad_scale": torch.tensor(1024.0, device=device), "found_inf": torch.tensor(1.0, device=device)}
    elif amp == "lr_tensor":
        extra = {"lr_tensor": torch.tensor(0.003, device=device)}
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8, amsgrad=amsgrad, maximize=maximize,
                 decoupled_weight_decay=decoupled, **extra)
    torch.ops.torchfast.fused_adam_(*lists, **hyper)
    ref.fused_adam_(*expected, **hyper)
    for got, want in zip(lists, expected):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("amp", ["none", "scale", "found_inf"])
def test_fused_sgd_kernel_matches_reference(dtype, first, amp, device):
    require_kernel("fused_sgd_", device)
    params, grads, bufs, _, _, _ = _adam_lists(dtype, device, False)
    lists = [params, grads, bufs]
    expected = _clone_lists(lists)
    extra = {}
    if amp != "none":
        extra = {"grad_scale": torch.tensor(64.0, device=device),
                 "found_inf": torch.tensor(1.0 if amp == "found_inf" else 0.0, device=device)}
    hyper = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=True,
                 is_first_step=first, **extra)
    torch.ops.torchfast.fused_sgd_(*lists, **hyper)
    ref.fused_sgd_(*expected, **hyper)
    for got, want in zip(lists, expected):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)


def test_mixed_dtypes_in_one_call(device):
    require_kernel("fused_adam_", device)
    lists = [sum(x, []) for x in zip(_adam_lists(torch.float32, device, True),
                                      _adam_lists(torch.bfloat16, device, True, seed=3))]
    expected = _clone_lists(lists)
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=True, maximize=False,
                 decoupled_weight_decay=False)
    torch.ops.torchfast.fused_adam_(*lists, **hyper)
    ref.fused_adam_(*expected, **hyper)
    for got, want in zip(lists, expected):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tol(a.dtype))


def _opcheck_args(device, op):
    params, grads, m, v, vmax, steps = _adam_lists(torch.float32, device, True)
    keep = [i for i, p in enumerate(params) if p.numel() > 0]  # opcheck's fake-tensor pass wants real data
    pick = lambda lst: [lst[i] for i in keep]  # noqa: E731
    if op == "fused_adam_":
        return ((pick(params), pick(grads), pick(m), pick(v), pick(vmax), pick(steps)),
                dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8, amsgrad=True, maximize=False,
                     decoupled_weight_decay=True, grad_scale=torch.tensor(2.0, device=device),
                     found_inf=torch.tensor(0.0, device=device)))
    return ((pick(params), pick(grads), pick(m)),
            dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=False,
                 is_first_step=False))


@pytest.mark.parametrize("op", ["fused_adam_", "fused_sgd_"])
def test_opcheck(op, device):
    require_kernel(op, device)
    args, kwargs = _opcheck_args(device, op)
    torch.library.opcheck(getattr(torch.ops.torchfast, op).default, args, kwargs)


def test_torch_compile_fullgraph(device):
    require_kernel("fused_adam_", device)
    lists = _adam_lists(torch.float32, device, False)
    expected = _clone_lists(lists)
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                 decoupled_weight_decay=False)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(*lists):
        torchfast.ops.optim.fused_adam_(*lists, **hyper)

    step(*lists)
    ref.fused_adam_(*expected, **hyper)
    for got, want in zip(lists, expected):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tol(torch.float32))


# ---- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs,match", [
    ("Adam", {"lr": -1.0}, "Invalid learning rate: -1.0"),
    ("Adam", {"eps": -1e-8}, "Invalid epsilon value"),
    ("Adam", {"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0: 1.0"),
    ("AdamW", {"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1"),
    ("Adam", {"weight_decay": -0.1}, "Invalid weight_decay value"),
    ("Adam", {"lr": torch.tensor([0.1, 0.2])}, "Tensor lr must be 1-element"),
    ("SGD", {"momentum": -0.5}, "Invalid momentum value"),
    ("SGD", {"nesterov": True}, "Nesterov momentum requires a momentum"),
    ("SGD", {"lr": 0.1, "differentiable": True}, "does not support differentiable=True"),
])
def test_bad_hyperparameters(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(torchfast.optim, name)([torch.zeros(2, requires_grad=True)], **kwargs)


def test_sparse_grad_is_rejected():
    p = torch.zeros(4, 3, requires_grad=True)
    p.grad = torch.zeros(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match=r"does not support sparse gradients.*shape \(4, 3\)"):
        torchfast.optim.Adam([p]).step()


def test_mismatched_lists_get_clear_errors():
    require_kernel("fused_adam_", "cpu")
    params, grads, m, v, _, steps = _adam_lists(torch.float32, "cpu", False)
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                 decoupled_weight_decay=False)
    with pytest.raises(RuntimeError, match="grads has 6 tensors but params has 7"):
        torch.ops.torchfast.fused_adam_(params, grads[:-1], m, v, [], steps, **hyper)
    bad = list(grads)
    bad[2] = torch.zeros(98)
    with pytest.raises(RuntimeError, match=r"grads\[2\] has shape \[98\] but params\[2\] has shape \[97\]"):
        torch.ops.torchfast.fused_adam_(params, bad, m, v, [], steps, **hyper)
    bad[2] = grads[2].double()
    with pytest.raises(RuntimeError, match=r"grads\[2\] has dtype Double but params\[2\] has dtype Float"):
        torch.ops.torchfast.fused_adam_(params, bad, m, v, [], steps, **hyper)
    before = [p.clone() for p in params]
    with pytest.raises(RuntimeError, match=r"params\[1\] has dtype Int"):
        torch.ops.torchfast.fused_adam_([params[0], torch.zeros(1, dtype=torch.int32)], grads[:2], m[:2], v[:2], [],
                                        steps[:2], **hyper)
    assert torch.equal(params[0], before[0]), "a failed call must not have updated anything"


def test_mixed_devices_get_clear_error_on_reference_path():
    with pytest.raises(RuntimeError, match="params\\[0\\] is on cpu but params\\[1\\] is on meta"):
        ref.fused_sgd_([torch.zeros(2), torch.zeros(2, device="meta")], [torch.zeros(2)] * 2, [], lr=0.1,
                       momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                       is_first_step=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_devices_get_clear_error():
    params = [torch.zeros(3, requires_grad=True), torch.zeros(3, device="cuda", requires_grad=True)]
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="one device"):
        torchfast.optim.Adam(params).step()


# ---- the eager entry points and the Autograd-key kernels ---------------------------------------------


def test_tensor_subclasses_take_the_torch_ops_path():
    """The eager entry points accept plain tensors and Parameters only; a subclass goes through torch.ops."""
    require_kernel("fused_sgd_", "cpu")

    class Tagged(torch.Tensor):
        pass

    params = [torch.ones(5).as_subclass(Tagged), torch.nn.Parameter(torch.ones(3))]
    grads = [torch.full((5,), 2.0), torch.full((3,), 2.0)]
    with torch.no_grad():
        torchfast.ops.optim.fused_sgd_(params, grads, [], lr=0.5)
    assert all(torch.equal(p, torch.zeros_like(p)) for p in params)


def test_in_place_update_bumps_versions_and_refuses_grad_mode():
    require_kernel("fused_adam_", "cpu")
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    opt = torchfast.optim.Adam([p], lr=0.1)
    before = p._version
    opt.step()
    assert p._version > before, "autograd must see the in-place update"
    lists = [[p], [p.grad], [torch.zeros(4)], [torch.zeros(4)], [], [torch.zeros(())]]
    with pytest.raises(RuntimeError, match="call it under torch.no_grad"):
        torch.ops.torchfast.fused_adam_(*lists, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8,
                                        amsgrad=False, maximize=False, decoupled_weight_decay=False)


def test_building_and_stepping_does_not_import_dynamo(tmp_path):
    """torch.optim wraps add_param_group (called by __init__), zero_grad, state_dict and
    load_state_dict in torch._disable_dynamo, whose first call imports torch._dynamo (over a second
    of start-up); torchfast's optimizers run them undecorated outside compiled code."""
    import subprocess
    import sys
    code = ("import sys, torch, torchfast\n"
            "p = torch.nn.Parameter(torch.randn(3))\n"
            "for cls in (torchfast.optim.SGD, torchfast.optim.Adam, torchfast.optim.AdamW):\n"
            "    opt = cls([p], lr=0.1)\n"
            "    p.grad = torch.ones(3); opt.step(); opt.zero_grad()\n"
            "    opt.load_state_dict(opt.state_dict()); opt.add_param_group({'params': [torch.nn.Parameter(torch.ones(2))]})\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n")
    import os
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(torchfast.__file__)))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]


def test_undecorated_methods_still_work_inside_compiled_code():
    p = torch.nn.Parameter(torch.randn(4))
    opt = torchfast.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(4)

    @torch.compile(backend="eager")
    def clear():
        opt.zero_grad(set_to_none=True)
        return p * 2

    clear()
    assert p.grad is None
