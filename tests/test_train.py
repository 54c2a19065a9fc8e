"""The Trainer: exact resume, atomic and validated checkpoints, accumulation, AMP, callbacks, Ctrl-C."""
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchfast
from torchfast.train import EarlyStopping, ModelCheckpoint, Trainer, load_checkpoint, save_checkpoint


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return TensorDataset(x, y)


def make(seed=0, dropout=0.2, lr=0.05, epochs=4, batch=16, **kwargs):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 3))
    opt = torchfast.optim.AdamW(model.parameters(), lr=lr)
    train = DataLoader(data(), batch_size=batch, shuffle=True)
    val = DataLoader(data(48, seed=1), batch_size=32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(train))
    return Trainer(model, opt, nn.CrossEntropyLoss(), train, val, scheduler=sched, scheduler_interval="batch",
                   log=lambda *_: None, **kwargs)


def test_resume_is_exact(tmp_path):
    """N epochs straight and N/2 + resume + N/2 give identical parameters (CPU)."""
    straight = make()
    straight.fit(4)
    first = make(callbacks=[ModelCheckpoint(str(tmp_path))])
    first.fit(2)
    torch.manual_seed(1234)  # the resumed run must not depend on the RNG state it starts with
    second = make(callbacks=[ModelCheckpoint(str(tmp_path))])
    second.fit(4, resume_from=str(tmp_path / "last.pt"))
    for p, q in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)
    assert [h["train_loss"] for h in second.history] == [h["train_loss"] for h in straight.history]
    assert second.epoch == 4 and second.global_step == straight.global_step


def test_checkpoint_is_atomic_and_validated(tmp_path):
    path = str(tmp_path / "ck.pt")
    save_checkpoint({"x": torch.ones(2)}, path)
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(2))
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []  # no temporary left behind
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="ck.pt' is corrupt or not a torchfast checkpoint"):
        load_checkpoint(path)
    torch.save({"model": {}}, path)
    with pytest.raises(RuntimeError, match="is not a torchfast checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_mismatched_checkpoint_gets_a_clear_error(tmp_path):
    t = make(callbacks=[ModelCheckpoint(str(tmp_path))])
    t.fit(1)
    other = Trainer(nn.Linear(10, 3), torch.optim.SGD(nn.Linear(10, 3).parameters(), lr=0.1), nn.CrossEntropyLoss(),
                    t.train_loader, log=lambda *_: None)
    with pytest.raises(RuntimeError, match="does not match this model"):
        other.resume(str(tmp_path / "last.pt"))


def test_best_and_last_checkpoints(tmp_path):
    t = make(callbacks=[ModelCheckpoint(str(tmp_path), monitor="val_accuracy", mode="max")])
    t.fit(3)
    best = load_checkpoint(str(tmp_path / "best.pt"))
    last = load_checkpoint(str(tmp_path / "last.pt"))
    assert last["epoch"] == 3
    best_epoch = max(range(3), key=lambda i: t.history[i]["val_accuracy"]) + 1
    assert best["epoch"] == best_epoch


def test_early_stopping():
    t = make(lr=0.0, callbacks=[EarlyStopping(monitor="val_loss", patience=2)])  # lr 0: nothing improves
    t.fit(20)
    assert len(t.history) == 3


def test_gradient_accumulation_equals_big_batch():
    """Two batches of 8 accumulated equal one batch of 16 (no dropout, mean loss, SGD)."""
    def run(batch, accum):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
        opt = torchfast.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loader = DataLoader(data(64), batch_size=batch, shuffle=False)
        Trainer(model, opt, nn.CrossEntropyLoss(), loader, grad_accum_steps=accum, log=lambda *_: None).fit(2)
        return list(model.parameters())

    for p, q in zip(run(16, 1), run(8, 2)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_clipping_and_bf16_autocast(fused):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = (torchfast.optim.Adam if fused else torch.optim.Adam)(model.parameters(), lr=0.01)
    t = Trainer(model, opt, nn.CrossEntropyLoss(), DataLoader(data(), batch_size=16),
                DataLoader(data(48, seed=1), batch_size=16), amp="bf16", max_grad_norm=0.5, log=lambda *_: None)
    history = t.fit(5)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    if fused:
        assert opt.param_groups[0]["max_grad_norm"] == 0.5 and opt.last_grad_norm is not None


def test_bad_arguments():
    model = nn.Linear(10, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="amp must be one of"):
        Trainer(model, opt, nn.CrossEntropyLoss(), [], amp="fp8")
    with pytest.raises(ValueError, match="amp='fp16' needs a GPU"):
        Trainer(model, opt, nn.CrossEntropyLoss(), [], amp="fp16", device="cpu")
    with pytest.raises(ValueError, match="grad_accum_steps must be >= 1"):
        Trainer(model, opt, nn.CrossEntropyLoss(), [], grad_accum_steps=0)


def test_ctrl_c_writes_a_resumable_checkpoint(tmp_path):
    t = make(checkpoint_dir=str(tmp_path))
    calls = {"n": 0}
    loss = t.loss_fn

    def interrupting(out, y):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return loss(out, y)

    t.loss_fn = interrupting
    with pytest.raises(KeyboardInterrupt):
        t.fit(3)
    resumed = make()
    resumed.resume(str(tmp_path / "interrupted.pt"))
    assert resumed.epoch == 1  # the interrupted epoch restarts
    resumed.fit(3)
    assert resumed.epoch == 3


def test_activation_checkpointing_gives_the_same_training():
    a = make(dropout=0.0)
    b = make(dropout=0.0)
    b = Trainer(b.model, b.optimizer, b.loss_fn, b.train_loader, b.val_loader, scheduler=b.scheduler,
                scheduler_interval="batch", log=lambda *_: None, checkpoint_modules=[b.model[0], b.model[3]])
    for t in (a, b):
        torch.manual_seed(5)  # the same shuffles
        t.fit(2)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q)


def test_debug_helpers():
    from torchfast.train.debug import capture_activations, count_parameters, memory_report
    model = nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 2))
    counts = count_parameters(model)
    assert counts["total"] == counts["trainable"] == 10 * 4 + 4 + 4 * 2 + 2
    assert counts["per_module"] == {"0": 44, "2": 10}
    with capture_activations(model) as acts:
        model(torch.randn(3, 10))
    assert set(acts) == {"0", "1", "2"} and acts["2"].shape == (3, 2)
    assert all(not m._forward_hooks for m in model.modules()), "hooks removed afterwards"
    with pytest.raises(KeyError, match="no submodule named"):
        with capture_activations(model, ["nope"]):
            pass
    model(torch.randn(3, 10)).sum().backward()
    report = memory_report(model)
    assert report["parameters"] == 54 * 4 and report["gradients"] == 54 * 4


def test_tensorboard_logs_scalars_histograms_and_graph(tmp_path):
    pytest.importorskip("tensorboard")
    from torchfast.train import TensorBoard
    tb = TensorBoard(str(tmp_path), histograms=True, graph_input=torch.randn(2, 10))
    make(callbacks=[tb]).fit(1)
    tb.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"train_loss", "val_loss", "val_accuracy", "lr", "samples_per_s"} <= set(events.Tags()["scalars"])
    assert any(t.startswith("grads/") for t in events.Tags()["histograms"])
    assert events.Tags()["graph"]


def test_user_metric_is_logged():
    t = make(metric=lambda out, y: float((out.argmax(1) == y).float().mean()))
    t.fit(1)
    assert "val_metric" in t.history[0] and 0.0 <= t.history[0]["val_metric"] <= 1.0
    t2 = make(metric=None)
    t2.fit(1)
    assert set(t2.history[0]) >= {"val_loss", "train_loss"} and "val_accuracy" not in t2.history[0]
