"""The main job: `torchfast train` on scikit-learn's digits."""
import json
import os
import subprocess
import sys

import pytest

import torchfast
from torchfast import cli
from torchfast.train.job import JobConfig, run

pytest.importorskip("sklearn")
pytest.importorskip("tensorboard")

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(torchfast.__file__)))


def test_default_run_reaches_97_percent(tmp_path):
    summary = run(JobConfig(out=str(tmp_path / "run")), log=lambda *_: None)
    assert summary["val_accuracy"] >= 0.97, summary
    assert summary["epochs"] == 12 and summary["seconds"] < 120
    on_disk = json.load(open(tmp_path / "run" / "summary.json"))
    assert set(on_disk) >= {"val_accuracy", "val_loss", "epochs", "seconds", "samples_per_s"}
    assert 0.0 <= on_disk["val_accuracy"] <= 1.0
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "last.pt")
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "best.pt")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "run" / "tensorboard"))


def test_eager_and_bf16_variants(tmp_path):
    eager = run(JobConfig(out=str(tmp_path / "eager"), epochs=2, eager=True), log=lambda *_: None)
    assert eager["model"] == "plain torch" and eager["val_accuracy"] > 0.5
    bf16 = run(JobConfig(out=str(tmp_path / "bf16"), epochs=2, amp="bf16"), log=lambda *_: None)
    assert bf16["amp"] == "bf16" and bf16["val_loss"] < 2.3


def test_command_line(tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": PKG_PARENT}
    done = subprocess.run([sys.executable, "-m", "torchfast", "train", "--out", str(out), "--synthetic", "12",
                           "--epochs", "1", "--batch-size", "128"], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=600)
    assert done.returncode == 0, done.stderr
    assert "done: 1 epochs" in done.stdout and "summary.json" in done.stdout
    again = subprocess.run([sys.executable, "-m", "torchfast", "train", "--out", str(tmp_path / "cli2"), "--synthetic",
                            "12", "--epochs", "1", "--batch-size", "128", "--resume",
                            str(out / "checkpoints" / "last.pt")], capture_output=True, text=True, env=env,
                           cwd=str(tmp_path), timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.load(open(tmp_path / "cli2" / "summary.json"))["epochs"] == 1  # already complete: nothing to redo


def test_resume_with_another_schedule_is_refused(tmp_path):
    run(JobConfig(out=str(tmp_path / "a"), epochs=1, synthetic=12), log=lambda *_: None)
    with pytest.raises(ValueError, match="resume with the run's own --epochs"):
        run(JobConfig(out=str(tmp_path / "b"), epochs=3, synthetic=12,
                      resume=str(tmp_path / "a" / "checkpoints" / "last.pt")), log=lambda *_: None)


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--batch-size", "-2"], "--batch-size must be at least 1, got -2"),
    (["--lr", "0"], "--lr must be positive"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
    (["--resume", "no/such/file.pt"], "no such checkpoint file"),
])
def test_command_line_user_errors_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
