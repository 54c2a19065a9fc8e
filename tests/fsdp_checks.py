"""Checks of torchfast under FSDP2 (`fully_shard`) and DTensor, run by tests/test_fsdp.py in 2 processes
(torchrun, gloo, CPU). Each check runs on every rank; a rank writes {check: "ok" | error} to
OUT/rank<r>.json. Usage: torchrun --nproc_per_node=2 tests/fsdp_checks.py OUT CHECK [CHECK ...]"""
import copy
import datetime
import json
import math
import os
import sys
import traceback
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import torchfast
from torchfast.reference import modules as plain
from torchfast.sharded import ShardedGradScaler, fully_shard

CHECKS = {}
RANK = WORLD = 0
OUT = ""


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def mlp():
    """Uneven shards over 2 ranks: 7 rows split 4/3, 5 rows 3/2, and a 1-row layer empty on rank 1."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1))


def sharded(model, units=(), **kwargs):
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


def sharded_mlp():
    m = mlp()
    return sharded(m, [m[0], m[2]])


def batches(steps, n=8, features=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, features, generator=g) for _ in range(steps)]


def my_half(x):
    """This rank's share of a global batch: FSDP averages the grads over the ranks, so the sharded
    model's step on the halves equals the unsharded model's step on the whole batch."""
    n = x.shape[0] // WORLD
    return x[RANK * n:(RANK + 1) * n]


def loss_of(out):
    return out.square().mean()


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_params_close(sharded_model, reference, rtol=1e-6, atol=1e-7, what=""):
    for (name, p), q in zip(sharded_model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(full(p.detach()), q.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{what} {name}: {m}")


@contextmanager
def counting_all_reduces():
    calls = []
    original = dist.all_reduce

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counted
    try:
        yield calls
    finally:
        dist.all_reduce = original


OPTIMIZERS = {
    "SGD": (torch.optim.SGD, torchfast.optim.SGD, dict(lr=0.1)),
    "SGD-momentum-nesterov-wd": (torch.optim.SGD, torchfast.optim.SGD,
                                 dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "SGD-momentum-dampening-maximize": (torch.optim.SGD, torchfast.optim.SGD,
                                        dict(lr=0.05, momentum=0.8, dampening=0.1, maximize=True)),
    "Adam-amsgrad": (torch.optim.Adam, torchfast.optim.Adam, dict(lr=0.05, amsgrad=True, weight_decay=0.01)),
    "AdamW": (torch.optim.AdamW, torchfast.optim.AdamW, dict(lr=0.05, betas=(0.8, 0.99))),
}


def train_both(torch_cls, fast_cls, kwargs, steps=5, clip=None, fast_extra=None, separate_clip=False):
    reference, model = mlp(), sharded_mlp()
    ref_opt = torch_cls(reference.parameters(), **kwargs)
    opt = fast_cls(model.parameters(), **kwargs, **(fast_extra or {}))
    for x in batches(steps):
        loss_of(reference(x)).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        ref_opt.step()
        ref_opt.zero_grad()
        loss_of(model(my_half(x))).backward()
        if separate_clip:
            torchfast.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return model, reference, opt


@check
def optimizers_match_unsharded():
    for name, (torch_cls, fast_cls, kwargs) in OPTIMIZERS.items():
        model, reference, opt = train_both(torch_cls, fast_cls, kwargs)
        assert_params_close(model, reference, what=name)
        for p in model.parameters():
            for key, value in opt.state[p].items():
                if key == "step":
                    assert not isinstance(value, DTensor), f"{name}: step should be a plain tensor, as torch keeps it"
                    continue
                assert isinstance(value, DTensor) and value.placements == p.placements, \
                    f"{name}: state {key} is {type(value).__name__} {getattr(value, 'placements', '')}"
                assert value.to_local().shape == p.to_local().shape


@check
def clipping_in_the_step_and_separately():
    for name, (torch_cls, fast_cls, kwargs) in [("AdamW", OPTIMIZERS["AdamW"]),
                                                ("SGD-momentum", OPTIMIZERS["SGD-momentum-nesterov-wd"])]:
        model, reference, opt = train_both(torch_cls, fast_cls, kwargs, clip=0.05, fast_extra=dict(max_grad_norm=0.05))
        assert_params_close(model, reference, what=f"{name} max_grad_norm")
        model, reference, _ = train_both(torch_cls, fast_cls, kwargs, clip=0.05, separate_clip=True)
        assert_params_close(model, reference, what=f"{name} clip_grad_norm_")
    # the norm of the step is one collective per group, not one per tensor
    model = sharded_mlp()
    opt = torchfast.optim.AdamW(model.parameters(), lr=0.01, max_grad_norm=0.05)
    loss_of(model(my_half(batches(1)[0]))).backward()
    with counting_all_reduces() as calls:
        opt.step()
    assert len(calls) == 1, f"{len(calls)} all-reduces in a clipped step"
    reference = mlp()
    loss_of(reference(batches(1)[0])).backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
    torch.testing.assert_close(opt.last_grad_norm, expected, rtol=1e-6, atol=0)


@check
def clip_grad_norm_matches_torch():
    """Against torch's clip on the unsharded model (torch's own clip on these FSDP2 grads raises for the
    inf norm: `_foreach_norm` refuses the shard that is empty on rank 1), and against torch's clip on
    the sharded grads for the type it returns."""
    x = batches(1)[0]
    for norm_type in (2.0, 1.0, math.inf, -math.inf, 3.0):  # -inf: the smallest |g|; rank 1 has empty shards
        ours, reference = sharded_mlp(), mlp()
        loss_of(ours(my_half(x))).backward()
        loss_of(reference(x)).backward()
        with counting_all_reduces() as calls:
            total = torchfast.nn.utils.clip_grad_norm_(ours.parameters(), 0.01, norm_type=norm_type)
        expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01, norm_type=norm_type)
        assert len(calls) == 1, f"norm {norm_type}: {len(calls)} all-reduces (one per clip expected)"
        assert isinstance(total, DTensor) and total.placements == (Replicate(),), \
            f"norm {norm_type}: got {type(total).__name__} {getattr(total, 'placements', '')}"
        torch.testing.assert_close(total.full_tensor(), expected, rtol=1e-6, atol=0)
        for p, q in zip(ours.parameters(), reference.parameters()):
            assert isinstance(p.grad, DTensor)
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-6, atol=1e-8)
        norm = torchfast.nn.utils.get_total_norm([p.grad for p in ours.parameters()], norm_type)
        torch.testing.assert_close(norm.full_tensor(), torch.nn.utils.get_total_norm(
            [p.grad for p in reference.parameters()], norm_type), rtol=1e-6, atol=0)
    ours, theirs = sharded_mlp(), sharded_mlp()
    for m in (ours, theirs):
        loss_of(m(my_half(x))).backward()
    try:  # documented: no norm_type 0 (a count) on DTensors
        torchfast.nn.utils.get_total_norm([p.grad for p in ours.parameters()], 0)
    except ValueError as e:
        assert "norm_type=0 on DTensor" in str(e)
    else:
        raise AssertionError("norm_type=0 on DTensor grads was accepted")
    total = torchfast.nn.utils.clip_grad_norm_(ours.parameters(), 0.01)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.01)
    assert type(total) is type(expected) and total.placements == expected.placements
    torch.testing.assert_close(total.full_tensor(), expected.full_tensor(), rtol=1e-6, atol=0)
    # non-finite: the error torch raises, on every rank (the norm is the reduced one)
    model = sharded_mlp()
    loss_of(model(my_half(x))).backward()
    if RANK == 1:
        model[0].weight.grad.to_local()[0, 0] = float("inf")
    try:
        torchfast.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
    except RuntimeError as e:
        assert "non-finite" in str(e)
    else:
        raise AssertionError("an inf on one rank's shard did not raise on rank %d" % RANK)


@check
def replicated_dtensors():
    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(3)
    values = [torch.randn(4, 3), torch.randn(5)]
    grads = [torch.randn(4, 3), torch.randn(5)]
    plain_params = [nn.Parameter(v.clone()) for v in values]
    params = [nn.Parameter(distribute_tensor(v.clone(), mesh, [Replicate()])) for v in values]
    ref_opt = torch.optim.AdamW(plain_params, lr=0.1)
    opt = torchfast.optim.AdamW(params, lr=0.1, max_grad_norm=1.0)
    for step in range(3):
        for p, q, g in zip(params, plain_params, grads):
            p.grad = distribute_tensor(g * (step + 1), mesh, [Replicate()])
            q.grad = g * (step + 1)
        torch.nn.utils.clip_grad_norm_(plain_params, 1.0)
        with counting_all_reduces() as calls:
            opt.step()
        assert not calls, "a replicated group needs no collective for its norm"
        ref_opt.step()
    for p, q in zip(params, plain_params):
        assert p.placements == (Replicate(),)
        torch.testing.assert_close(p.to_local(), q.detach(), rtol=1e-6, atol=1e-7)


@check
def mixed_dtensor_and_plain_group():
    """A group holding both: plain tensors are taken as replicated (what DDP and FSDP2 keep them)."""
    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(4)
    full_values, plain_value = torch.randn(6, 2), torch.randn(3)
    full_grad, plain_grad = torch.randn(6, 2), torch.randn(3)
    shard = nn.Parameter(distribute_tensor(full_values.clone(), mesh, [Shard(0)]))
    other = nn.Parameter(plain_value.clone())
    refs = [nn.Parameter(full_values.clone()), nn.Parameter(plain_value.clone())]
    opt = torchfast.optim.SGD([shard, other], lr=0.1, momentum=0.9, max_grad_norm=0.5)
    ref_opt = torch.optim.SGD(refs, lr=0.1, momentum=0.9)
    for _ in range(3):
        shard.grad, other.grad = distribute_tensor(full_grad.clone(), mesh, [Shard(0)]), plain_grad.clone()
        refs[0].grad, refs[1].grad = full_grad.clone(), plain_grad.clone()
        torch.nn.utils.clip_grad_norm_(refs, 0.5)
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(shard.full_tensor(), refs[0].detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(other.detach(), refs[1].detach(), rtol=1e-6, atol=1e-7)
    norm = torchfast.nn.utils.get_total_norm([shard.grad, other.grad])
    torch.testing.assert_close(norm.full_tensor(), torch.cat([full_grad.flatten(), plain_grad]).norm(), rtol=1e-6, atol=0)


def dcp_save(model, opt, path):
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path)


def dcp_load(model, opt, path):
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def train_steps(model, opt, xs):
    for x in xs:
        loss_of(model(my_half(x))).backward()
        opt.step()
        opt.zero_grad()


def saved_and_resumed(first_cls, second_cls, kwargs, path, xs):
    """(model, resumed): `first_cls` trains 3 steps, is saved through DCP and trains on; a fresh model with
    `second_cls` loads the checkpoint and takes the same remaining steps."""
    model = sharded_mlp()
    opt = first_cls(model.parameters(), **kwargs)
    train_steps(model, opt, xs[:3])
    dcp_save(model, opt, path)
    train_steps(model, opt, xs[3:])
    resumed = sharded_mlp()
    resumed_opt = second_cls(resumed.parameters(), **kwargs)
    dcp_load(resumed, resumed_opt, path)
    train_steps(resumed, resumed_opt, xs[3:])
    return model, resumed


@check
def dcp_save_load_continues_identically():
    xs = batches(5)
    for name, (_, fast_cls, kwargs) in OPTIMIZERS.items():
        model, again = saved_and_resumed(fast_cls, fast_cls, kwargs, os.path.join(OUT, f"dcp-{name}"), xs)
        for p, q in zip(model.parameters(), again.parameters()):
            assert torch.equal(p.to_local(), q.to_local()), f"{name}: the resumed run differs"


@check
def torch_optim_checkpoints_load_both_ways():
    xs = batches(5)
    for name, (torch_cls, fast_cls, kwargs) in OPTIMIZERS.items():
        for first, second in ((torch_cls, fast_cls), (fast_cls, torch_cls)):
            path = os.path.join(OUT, f"cross-{name}-{first.__module__.split('.')[0]}")
            model, other = saved_and_resumed(first, second, kwargs, path, xs)
            for p, q in zip(model.parameters(), other.parameters()):
                torch.testing.assert_close(p.to_local(), q.to_local(), rtol=1e-6, atol=1e-7,
                                           msg=lambda m: f"{name} {first.__module__} -> {second.__module__}: {m}")


@check
def sharded_grad_scaler_skips_together():
    xs = batches(3)
    model, reference = sharded_mlp(), sharded_mlp()
    opt = torchfast.optim.AdamW(model.parameters(), lr=0.05, max_grad_norm=1.0)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.05)
    scaler = ShardedGradScaler("cpu", init_scale=2.0 ** 10)
    ref_scaler = torch.distributed.fsdp.sharded_grad_scaler.ShardedGradScaler("cpu", init_scale=2.0 ** 10)
    for step, x in enumerate(xs):
        for m, s in ((model, scaler), (reference, ref_scaler)):
            s.scale(loss_of(m(my_half(x)))).backward()
            if step == 1 and RANK == 1:  # an overflow on one rank's shard only
                m[2].weight.grad.to_local()[0, 0] = float("inf")
        before = [p.to_local().clone() for p in model.parameters()]
        scaler.step(opt)  # the fused path: no unscale_ call, the optimizer unscales in its kernel
        scaler.update()
        ref_scaler.unscale_(ref_opt)  # torch's order for its sharded scaler
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        opt.zero_grad()
        ref_opt.zero_grad()
        skipped = all(torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters()))
        assert skipped == (step == 1), f"step {step}: skipped={skipped} on rank {RANK}"
        scales = [None] * WORLD
        dist.all_gather_object(scales, float(scaler.get_scale()))
        assert len(set(scales)) == 1, f"the ranks' scales part ways: {scales}"
        assert scaler.get_scale() == ref_scaler.get_scale()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.to_local(), q.to_local(), rtol=1e-6, atol=1e-7)


def complex_networks(block_unit=True, **kwargs):
    """The two networks sharded alike; without block_unit the ResidualBlock stays in the root unit (then
    ComplexNetwork's fused conv -> ReLU -> pool path runs: a unit's FSDP hooks on the block make the
    features take the plain path)."""
    torch.manual_seed(0)
    ours = torchfast.models.ComplexNetwork(num_classes=5, in_channels=3)
    theirs = plain.ComplexNetwork(num_classes=5, in_channels=3)
    theirs.load_state_dict(ours.state_dict())
    for m in (ours, theirs):
        sharded(m, ([m.features[3]] if block_unit else []) + [m.attention, m.classifier], **kwargs)
    return ours, theirs


@check
def fused_layers_train_like_the_plain_stack():
    for reshard_after_forward in (True, False):  # False: the unsharded parameters stay, rewritten in place
        for block_unit in (True, False):
            _fused_layers_train_like_the_plain_stack(block_unit, reshard_after_forward=reshard_after_forward)


def _fused_layers_train_like_the_plain_stack(block_unit, **kwargs):
    torch.manual_seed(5 + RANK)  # each rank its own data, as a sharded loader gives
    # 8x3x32x32: large enough for the oneDNN convolutions and their cached channels_last weights, whose
    # cache FSDP2's in-place all-gathers (version counters kept) must not fool
    xs = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    targets = [torch.randint(0, 5, (8,)) for _ in range(3)]
    ours, theirs = complex_networks(block_unit, **kwargs)
    # SGD rather than Adam here: the conv biases before a BatchNorm get a gradient that is zero but for
    # rounding, which Adam's normalisation would blow up to full-size steps of either sign
    opt = torchfast.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9, max_grad_norm=1.0)
    ref_opt = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    for m in (ours, theirs):
        m.classifier[3].p = 0.0  # dropout off: the two runs draw their masks differently
    for x, t in zip(xs, targets):
        ours.eval(), theirs.eval()
        with torch.no_grad():  # inference between steps: no cached weights from before the last step
            torch.testing.assert_close(ours(xs[0]), theirs(xs[0]), rtol=1e-4, atol=1e-5)
        ours.train(), theirs.train()
        out, ref_out = ours(x), theirs(x)
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
        nn.functional.cross_entropy(out, t).backward()
        nn.functional.cross_entropy(ref_out, t).backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.to_local(), q.to_local(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for (name, b), c in zip(ours.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(xs[0]), theirs(xs[0]), rtol=1e-4, atol=1e-5)
    # the standalone fused layers, one unit each
    torch.manual_seed(0)
    fast = nn.Sequential(torchfast.nn.ConvBNReLU2d(3, 8, 3, padding=1), torchfast.nn.BatchNormReLU2d(8),
                         nn.Flatten(), nn.Linear(8 * 32 * 32, 4))
    slow = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
                         nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()), nn.Flatten(), nn.Linear(8 * 32 * 32, 4))
    slow[0].load_state_dict(fast[0].state_dict())
    slow[1][0].load_state_dict(fast[1].state_dict())
    slow[3].load_state_dict(fast[3].state_dict())
    sharded(fast, [fast[0], fast[1]], **kwargs)
    sharded(slow, [slow[0], slow[1]], **kwargs)
    opt = torchfast.optim.SGD(fast.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(slow.parameters(), lr=0.1, momentum=0.9)
    for x in xs:
        fast.eval(), slow.eval()
        with torch.no_grad():  # the folded conv-BN weights follow each step
            torch.testing.assert_close(fast(xs[0]), slow(xs[0]), rtol=1e-4, atol=1e-5)
        fast.train(), slow.train()
        for m, o in ((fast, opt), (slow, ref_opt)):
            loss_of(m(x)).backward()
            o.step()
            o.zero_grad()
    for p, q in zip(fast.parameters(), slow.parameters()):
        torch.testing.assert_close(p.to_local(), q.to_local(), rtol=1e-4, atol=1e-5)
    fast.eval(), slow.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(xs[0]), slow(xs[0]), rtol=1e-4, atol=1e-5)


@check
def trainer_resumes_exactly():
    """Trainer(fsdp=True): 2 epochs straight equal 1 epoch, a DCP checkpoint, and a resumed second epoch
    (ComplexNetwork with dropout and BatchNorm, shuffled sharded data, OneCycleLR, clipping in the step)."""
    from torch.utils.data import DataLoader, TensorDataset

    from torchfast.train import Trainer
    from torchfast.train.callbacks import ModelCheckpoint

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    folder = os.path.join(OUT, "trainer")

    def make():
        torch.manual_seed(0)
        model = torchfast.models.ComplexNetwork(num_classes=3)
        opt = torchfast.optim.AdamW(model.parameters(), lr=0.01)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, epochs=2, steps_per_epoch=4)
        return Trainer(model, opt, nn.CrossEntropyLoss(), DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True),
                       DataLoader(TensorDataset(x, y), batch_size=16), max_grad_norm=0.5, scheduler=schedule,
                       scheduler_interval="batch", callbacks=[ModelCheckpoint(folder, monitor="val_accuracy", mode="max")],
                       log=lambda *_: None, fsdp=True)

    straight = make()
    straight.fit(2)
    make().fit(1)
    assert os.path.isfile(os.path.join(folder, "last.dcp", "trainer.pt"))
    torch.manual_seed(1234)  # the resumed run must not depend on the RNG state it starts with
    resumed = make()
    resumed.fit(2, resume_from=os.path.join(folder, "last.dcp"))
    assert resumed.epoch == 2 and resumed.global_step == straight.global_step
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert isinstance(p, DTensor) and torch.equal(p.to_local(), q.to_local()), f"{name} differs after resume"
    for (name, b), c in zip(straight.model.named_buffers(), resumed.model.buffers()):
        assert torch.equal(b, c), f"buffer {name} differs after resume"
    untimed = [[{k: v for k, v in h.items() if k != "samples_per_s"} for h in t.history] for t in (straight, resumed)]
    assert untimed[0] == untimed[1], untimed


@check
def converted_models_under_ddp_and_fsdp():
    """torchfast.convert(torchvision resnet18) trains under DDP and under fully_shard like the original
    (same data per rank, one SGD step: 18 layers of training-mode batch norm amplify fp32 rounding over
    more steps, in torch's own model as much), and its converted optimizer steps the shards."""
    import torchvision

    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=4)
    torch.manual_seed(6 + RANK)
    xs = [torch.randn(8, 3, 64, 64)]
    ys = [torch.randint(0, 4, (8,))]
    for wrap in ("ddp", "fsdp"):
        plain_model, opt = copy.deepcopy(original), None
        fast = torchfast.convert(plain_model)
        if wrap == "ddp":
            plain_run, fast_run = nn.parallel.DistributedDataParallel(plain_model), nn.parallel.DistributedDataParallel(fast)
        else:
            sharded(plain_model, [b for layer in (plain_model.layer1, plain_model.layer2) for b in layer])
            sharded(fast, [b for layer in (fast.layer1, fast.layer2) for b in layer])
            plain_run, fast_run = plain_model, fast
        ref_opt = torch.optim.SGD(plain_model.parameters(), lr=0.05, momentum=0.9)
        fast, opt = torchfast.convert(fast, inplace=True, optimizer=torch.optim.SGD(fast.parameters(), lr=0.05,
                                                                                     momentum=0.9))
        assert not fast.torchfast_conversion.skipped, str(fast.torchfast_conversion)
        assert isinstance(opt, torchfast.optim.SGD)
        for x, y in zip(xs, ys):
            for run, o in ((plain_run, ref_opt), (fast_run, opt)):
                nn.functional.cross_entropy(run(x), y).backward()
                o.step()
                o.zero_grad()
        for (name, p), q in zip(fast.named_parameters(), plain_model.parameters()):
            torch.testing.assert_close(full(p.detach()), full(q.detach()), rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{wrap} {name}: {m}")
        fast.eval(), plain_model.eval()
        with torch.no_grad():  # the folded inference path on the trained (all-gathered) weights
            torch.testing.assert_close(fast_run(xs[0]), plain_run(xs[0]), rtol=1e-4, atol=1e-5)


@check
def partial_placements_are_refused():
    from torch.distributed.tensor import Partial
    mesh = init_device_mesh("cpu", (WORLD,))
    p = nn.Parameter(DTensor.from_local(torch.ones(3), mesh, [Partial()], run_check=False))
    p.grad = DTensor.from_local(torch.ones(3), mesh, [Partial()], run_check=False)
    for fn in (lambda: torchfast.optim.Adam([p]).step(), lambda: torchfast.nn.utils.get_total_norm([p.grad])):
        try:
            fn()
        except ValueError as e:
            assert "Partial" in str(e), str(e)
        else:
            raise AssertionError("a Partial DTensor was accepted")


def main():
    global RANK, WORLD, OUT
    OUT, names = sys.argv[1], sys.argv[2:] or list(CHECKS)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    results = {}
    for name in names:
        try:
            CHECKS[name]()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()[-3000:]
            print(f"rank {RANK}: {name} failed\n{results[name]}", file=sys.stderr, flush=True)
        dist.barrier()
    with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
