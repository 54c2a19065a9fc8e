"""torchfast under FSDP2 (fully_shard) and DTensor: tests/fsdp_checks.py's checks, run once in 2 processes
(torchrun, gloo, CPU), each reported here as its own test."""
import json
import os
import subprocess
import sys

import pytest
import torch

import torchfast

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(torchfast.__file__)))
sys.path.insert(0, HERE)
CHECKS = [  # the names of fsdp_checks.CHECKS, listed so that collection needs no torch.distributed import
    "optimizers_match_unsharded", "clipping_in_the_step_and_separately", "clip_grad_norm_matches_torch",
    "replicated_dtensors", "mixed_dtensor_and_plain_group", "dcp_save_load_continues_identically",
    "torch_optim_checkpoints_load_both_ways", "sharded_grad_scaler_skips_together",
    "fused_layers_train_like_the_plain_stack", "trainer_resumes_exactly", "converted_models_under_ddp_and_fsdp",
    "partial_placements_are_refused",
]


def test_the_list_is_every_check():
    import fsdp_checks
    assert sorted(fsdp_checks.CHECKS) == sorted(CHECKS)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONPATH": PKG_PARENT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(HERE, "fsdp_checks.py"), str(out)] + CHECKS,
                          capture_output=True, text=True, env=env, cwd=str(out), timeout=900)
    per_rank = []
    for rank in range(2):
        path = out / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no results:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        per_rank.append(json.loads(path.read_text()))
    return per_rank


@pytest.mark.parametrize("name", CHECKS)
def test_check(results, name):
    for rank, result in enumerate(results):
        assert result.get(name) == "ok", f"rank {rank}: {result.get(name, 'not run')}"


def run_cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": PKG_PARENT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torchfast"] + args, capture_output=True, text=True, env=env,
                          cwd=str(cwd), timeout=600)


def test_train_command_sharded(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    done = run_cli(["train", "--fsdp", "--nproc", "2", "--epochs", "1", "--synthetic", "12", "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.load(open(out / "summary.json"))
    assert summary["processes"] == 2 and summary["sharding"] == "fsdp" and summary["epochs"] == 1
    assert done.stdout.count("done: 1 epochs") == 1
    last = out / "checkpoints" / "last.dcp"
    assert (last / "trainer.pt").is_file() and not (out / "checkpoints" / "last.pt").exists()
    from torchfast.deploy.from_run import load_run
    trained = load_run(str(out))  # the sharded weights, read back whole in one process
    assert trained.checkpoint.endswith(".dcp") and trained.model.features[0].weight.shape[1] == 3
    again = run_cli(["train", "--fsdp", "--nproc", "2", "--epochs", "1", "--synthetic", "12", "--out",
                     str(tmp_path / "again"), "--resume", str(last)], tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert json.load(open(tmp_path / "again" / "summary.json"))["epochs"] == 1  # already complete


def test_fsdp_needs_processes(tmp_path):
    done = run_cli(["train", "--fsdp", "--epochs", "1", "--synthetic", "12", "--out", str(tmp_path / "x")], tmp_path)
    assert done.returncode == 2 and "--fsdp shards the model over processes: give --nproc 2 or more" in done.stderr
