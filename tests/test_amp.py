"""torch.amp.GradScaler with torchfast optimizers: the fused path (grad_scale/found_inf consumed by the
kernels), the ordinary unscale_ -> clip -> step order, and skipped steps."""
import contextlib

import pytest
import torch

import torchfast

STEPS = 10
INF_STEPS = {3, 7}  # steps whose loss is inf: the scaler must skip them and halve its scale


def make_model(device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)).to(device)


def batches(device):
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(16, 13, generator=g).to(device), torch.randint(0, 5, (16,), generator=g).to(device))
            for _ in range(STEPS)]


def autocast(device):
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()  # CPU: scaling without autocast still exercises the protocol


def train(device, make_opt, clip=None, unscale_first=False):
    """Returns the parameters, the optimizer, the scaler's final scale and its scale per step."""
    model = make_model(device)
    opt = make_opt(model.parameters())
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=2)
    scales = []
    for step, (x, y) in enumerate(batches(device)):
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        if step in INF_STEPS:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        if unscale_first:
            scaler.unscale_(opt)
            if clip is not None:
                clip(model.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return [p.detach() for p in model.parameters()], opt, scales


@pytest.mark.parametrize("name,options", [("Adam", {"weight_decay": 0.1}), ("AdamW", {"amsgrad": True}),
                                          ("SGD", {"momentum": 0.9})])
def test_fused_scaler_path_matches_torch(name, options, device):
    ours, opt, scales = train(device, lambda ps: getattr(torchfast.optim, name)(ps, lr=0.01, **options))
    theirs, _, ref_scales = train(device, lambda ps: getattr(torch.optim, name)(ps, lr=0.01, foreach=False,
                                                                                 **options))
    assert scales == ref_scales  # same skipped steps, same growth
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    if name != "SGD":  # skipped steps did not count
        assert all(float(s["step"]) == STEPS - len(INF_STEPS) for s in opt.state.values())


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_unscale_clip_step_order_matches_torch(name, device):
    kw = {"momentum": 0.9} if name == "SGD" else {}
    ours, _, scales = train(device, lambda ps: getattr(torchfast.optim, name)(ps, lr=0.01, **kw),
                            clip=torchfast.nn.utils.clip_grad_norm_, unscale_first=True)
    theirs, _, ref_scales = train(device, lambda ps: getattr(torch.optim, name)(ps, lr=0.01, foreach=False, **kw),
                                  clip=torch.nn.utils.clip_grad_norm_, unscale_first=True)
    assert scales == ref_scales
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_max_grad_norm_under_scaler_matches_unscale_clip_step(name, device):
    kw = {"momentum": 0.9} if name == "SGD" else {}
    ours, opt, scales = train(device, lambda ps: getattr(torchfast.optim, name)(ps, lr=0.01, max_grad_norm=0.5,
                                                                                 **kw))
    theirs, _, ref_scales = train(device, lambda ps: getattr(torch.optim, name)(ps, lr=0.01, foreach=False, **kw),
                                  clip=torch.nn.utils.clip_grad_norm_, unscale_first=True)
    assert scales == ref_scales
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(opt.last_grad_norm)  # the last step was not an inf step: an unscaled, finite norm


def test_inf_loss_step_changes_nothing(device):
    model = make_model(device)
    opt = torchfast.optim.Adam(model.parameters(), lr=0.1, max_grad_norm=1.0)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
    x, y = batches(device)[0]
    for step in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if step == 1:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b), "a skipped step must leave the parameters alone"
    assert all(float(s["step"]) == 1.0 for s in opt.state.values())
    assert scaler.get_scale() == 2.0 ** 9
