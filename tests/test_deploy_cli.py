"""`torchfast export` on what `torchfast train` produced: the verification and the table, and
one-line errors for a missing or foreign checkpoint, an opset too low, a missing onnxruntime."""
import builtins
import os

import pytest
import torch

from torchfast import cli
from torchfast.train.checkpoint import save_checkpoint
from torchfast.train.job import JobConfig, run

pytest.importorskip("sklearn")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run(JobConfig(out=str(out), epochs=3), log=lambda *_: None)
    return out


def test_export_prints_verification_and_table(trained_run, tmp_path, capsys):
    onnx_path = tmp_path / "digits.onnx"
    assert cli.main(["export", str(trained_run), "--onnx", str(onnx_path), "--quantize", "onnx-static",
                     "--prune", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "verified:" in out and "max error" in out
    assert "30.0%" in out  # the pruning report
    for row in ("torch eager fp32 (checkpoint)", "torch eager fp32, pruned 0.3", "onnxruntime fp32",
                "onnx-static int8"):
        assert row in out
    assert "| variant | batch 1 ms (x) | batch 32 ms (x) | size MB | size x | accuracy |" in out
    assert os.path.isfile(onnx_path) and os.path.isfile(tmp_path / "digits-onnx-static.onnx")


def test_export_of_a_checkpoint_file(trained_run, tmp_path, capsys):
    checkpoint = trained_run / "checkpoints" / "last.pt"
    assert cli.main(["export", str(checkpoint), "--onnx", str(tmp_path / "m.onnx"), "--opset", "23"]) == 0
    assert "opset 23" in capsys.readouterr().out


def _one_line_error(args, capsys) -> str:
    assert cli.main(["export", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchfast export: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_and_foreign_checkpoints(tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    assert "no such run directory or checkpoint" in _one_line_error([str(tmp_path / "nope"), "--onnx", out], capsys)
    assert "not a `torchfast train` run directory" in _one_line_error([str(tmp_path), "--onnx", out], capsys)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert "not a torchfast checkpoint" in _one_line_error([str(foreign), "--onnx", out], capsys)
    other_model = tmp_path / "other.pt"
    save_checkpoint({"model": torch.nn.Linear(2, 2).state_dict()}, str(other_model))
    assert "holds no ComplexNetwork" in _one_line_error([str(other_model), "--onnx", out], capsys)


def test_bad_options(trained_run, tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    assert "opset must be in [14" in _one_line_error([str(trained_run), "--onnx", out, "--opset", "11"], capsys)
    assert "[14, 20] for the legacy" in _one_line_error([str(trained_run), "--onnx", out, "--opset", "23", "--exporter",
                                                  "legacy"], capsys)
    assert "--prune takes a fraction" in _one_line_error([str(trained_run), "--onnx", out, "--prune", "1.5"], capsys)


def test_missing_onnxruntime(trained_run, tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    err = _one_line_error([str(trained_run), "--onnx", str(tmp_path / "m.onnx")], capsys)
    assert "onnxruntime is not installed: pip install 'torchfast[onnx]'" in err
