"""The main job: `torchfast train` on scikit-learn's digits, synthetic images or an image folder, with
ComplexNetwork or torchvision's ResNet-18."""
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
    (["--data", "no/such/folder"], "--data no/such/folder: not 'digits', 'synthetic' or a directory of images"),
    (["--model", "vgg"], "invalid choice: 'vgg'"),
    (["--image-size", "16"], "--image-size does not apply to the digits"),
    (["--image-size", "0", "--data", "synthetic"], "--image-size must be at least 1, got 0"),
])
def test_command_line_user_errors_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _image_folder(root, classes=("cat", "dog", "fox"), per_class=6, split=False):
    """A tiny ImageFolder: images of different sizes, each class one bright channel."""
    np = pytest.importorskip("numpy")
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for part in (("train", "val") if split else ("",)):
        for c, name in enumerate(classes):
            folder = os.path.join(root, part, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                pixels = (rng.random((10 + i, 12, 3)) * 120).astype("uint8")
                pixels[..., c] = 255
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return str(root)


def test_resnet18_on_an_image_folder(tmp_path):
    pytest.importorskip("torchvision")
    images = _image_folder(tmp_path / "images")
    summary = run(JobConfig(out=str(tmp_path / "run"), epochs=2, batch_size=6, model="resnet18", data=images,
                            image_size=16), log=lambda *_: None)
    assert summary["architecture"] == "resnet18" and summary["classes"] == 3 and summary["image_size"] == 16
    assert summary["data"] == os.path.abspath(images) and summary["epochs"] == 2
    from torchfast.deploy.from_run import load_run
    trained = load_run(str(tmp_path / "run"))  # what `torchfast export` starts from
    assert type(trained.model).__name__ == "ResNet" and trained.model.fc.out_features == 3
    assert trained.model.torchfast_conversion.swaps  # converted: torchfast's fused blocks
    assert len(trained.val_set) == 4 and tuple(trained.val_set[0][0].shape) == (3, 16, 16)


def test_image_folder_with_train_and_val_subfolders_and_the_eager_twin(tmp_path):
    pytest.importorskip("torchvision")
    from torchfast.train import data
    images = _image_folder(tmp_path / "images", per_class=2, split=True)
    train, val, channels, classes = data.image_folder_datasets(images, image_size=8)
    assert (len(train), len(val), channels, classes) == (6, 6, 3, 3)
    summary = run(JobConfig(out=str(tmp_path / "eager"), epochs=1, batch_size=4, model="resnet18", data=images,
                            image_size=8, eager=True), log=lambda *_: None)
    assert summary["model"] == "plain torch" and summary["architecture"] == "resnet18"


def test_resnet18_converted_and_plain_start_from_the_same_weights():
    pytest.importorskip("torchvision")
    import torch
    from torchfast.train.architectures import build_model
    torch.manual_seed(0)
    plain = build_model("resnet18", 1, 10, 8, fused=False)
    torch.manual_seed(0)
    fused = build_model("resnet18", 1, 10, 8, fused=True)
    assert plain.conv1.in_channels == 1 and plain.conv1.kernel_size == (3, 3) and isinstance(plain.maxpool, torch.nn.Identity)
    for (k, a), (k2, b) in zip(plain.state_dict().items(), fused.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(4, 1, 8, 8)
    plain.eval(), fused.eval()
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


def test_a_train_step_imports_neither_dynamo_nor_sympy(tmp_path):
    """Start-up of the main job: torch._dynamo (torch.optim's _disable_dynamo wrappers) and sympy
    (torch.broadcast_shapes) cost 0.5-1.6 s each on first use; torchfast's eager path needs neither."""
    code = ("import sys, torch, torchfast\n"
            "net = torchfast.models.ComplexNetwork(10, 1)\n"
            "opt = torchfast.optim.AdamW(net.parameters(), lr=1e-3, max_grad_norm=1.0)\n"
            "torch.nn.functional.cross_entropy(net(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()\n"
            "opt.step(); opt.zero_grad()\n"
            "late = [m for m in ('torch._dynamo', 'sympy') if m in sys.modules]\n"
            "assert not late, late\n")
    env = {**os.environ, "PYTHONPATH": PKG_PARENT}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
