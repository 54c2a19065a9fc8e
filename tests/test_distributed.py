"""DDP through torchrun: 2 processes (gloo, CPU) equal 1 process with the same global batch, with the
fused optimizer and clipping on; and `torchfast train --nproc 2`."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torchfast

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(torchfast.__file__)))

SCRIPT = textwrap.dedent("""
    import sys, torch, torchfast
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from torchfast.train import Trainer
    from torchfast.train.distributed import cleanup, from_environment

    out, batch = sys.argv[1], int(sys.argv[2])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torchfast.optim.AdamW(model.parameters(), lr=0.01)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)
    trainer = Trainer(model, opt, nn.CrossEntropyLoss(), loader, max_grad_norm=0.05, log=lambda *_: None)
    trainer.fit(3)
    if from_environment().is_main:
        torch.save([p.detach() for p in model.parameters()], out)
    cleanup()
""")


def run(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": PKG_PARENT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    run([str(script), str(tmp_path / "one.pt"), "16"], tmp_path)
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "two.pt"),
         "8"], tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for p, q in zip(one, two):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_train_command_with_two_processes(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    done = run(["-m", "torchfast", "train", "--nproc", "2", "--epochs", "1", "--synthetic", "12", "--out", str(out)],
               tmp_path)
    summary = json.load(open(out / "summary.json"))
    assert summary["processes"] == 2 and summary["epochs"] == 1
    assert os.path.isfile(out / "checkpoints" / "last.pt")
    assert done.stdout.count("done: 1 epochs") == 1  # rank 0 alone reports
    # every rank resumes from rank 0's checkpoint, though only rank 0 has a TensorBoard callback
    again = run(["-m", "torchfast", "train", "--nproc", "2", "--epochs", "1", "--synthetic", "12", "--out",
                 str(tmp_path / "again"), "--resume", str(out / "checkpoints" / "last.pt")], tmp_path)
    assert again.returncode == 0 and json.load(open(tmp_path / "again" / "summary.json"))["epochs"] == 1
