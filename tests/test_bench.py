"""The benchmark tools measure what they say: the attention report and its peak-memory probe."""
import json
import sys

import pytest

from torchfast.bench import attention as ba
from torchfast import cli


def test_attention_bench_cli_writes_tables_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--suites", "attention", "--rounds", "4", "--attn-lengths", "64",
                     "--attn-memory-lengths", "64", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| 64 | fwd+bwd | torchfast |" in text and "peak extra MiB" in text
    report = json.loads(out.read_text())
    rows = {(r["pass"], r["impl"]): r for r in report["attention"]}
    assert set(rows) == {(p, i) for p in ("fwd", "fwd+bwd") for i in ba.IMPLS}
    assert all(r["median_ms"] > 0 and r["GFLOP/s"] > 0 for r in rows.values())
    assert rows[("fwd", "torch SDPA")]["vs_sdpa"] == pytest.approx(1.0)


def test_norm_report_rows_dtype_and_layouts():
    import torch
    from torchfast.bench import norm as bench
    rows = bench.norm_report(rounds=1, warmup=0, batch=2, channels=8, size=4, dtype=torch.bfloat16,
                             with_compile=False)
    by = {(r["bench"], r["impl"]): r for r in rows}
    for label in ("BN+add+ReLU fwd+bwd", "BN+add+ReLU fwd+bwd, channels_last"):
        eager, ours = by[(label, "eager")], by[(label, "torchfast")]
        assert eager["ratio"] == 1.0 and ours["median_ms"] > 0
        # 11 passes of 2-byte elements
        assert ours["GB/s"] == pytest.approx(11 * 2 * 8 * 16 * 2 / (ours["median_ms"] * 1e-3) / 1e9)
    assert ("ResidualBlock train step", "torchfast ResidualBlock, channels_last in") in by
    assert ("ResidualBlock inference", "torchfast ResidualBlock") in by


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU memory probe reads /proc")
def test_flash_memory_grows_linearly_and_eager_quadratically():
    flash = [ba.peak_memory("torchfast", 2, 2, L, 32) for L in (512, 2048)]
    eager = [ba.peak_memory("eager", 2, 2, L, 32) for L in (512, 2048)]
    # x4 in L: outputs and grads grow x4 (4 MiB at L=2048); eager's (L, L) scores grow x16 (one
    # score tensor alone is 64 MiB at L=2048). The floor keeps an RSS reading near 0 at L=512 from
    # making the bound tighter than the linear growth it checks.
    assert flash[1] < 6 * max(flash[0], 4 << 20)
    assert eager[1] > 10 * eager[0] and eager[1] > 4 * flash[1]


def test_deploy_report_measures_every_variant(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from torchfast.bench import deploy as bench_deploy

    report = bench_deploy.deploy_report(models=["complexnet"], methods=["dynamic"], batches=(1, 3), rounds=2,
                                        log=lambda *_: None, workdir=str(tmp_path))
    rows = report["complexnet"]
    assert [r["variant"] for r in rows] == ["plain torch eager fp32", "torchfast eager fp32", "onnxruntime fp32",
                                            "ORT dynamic int8"]
    assert rows[0]["x@1"] == 1.0 and all(r["ms@1"] > 0 and r["ms@3"] > 0 for r in rows)
    assert rows[3]["size_mb"] < rows[2]["size_mb"]  # int8 MatMul/Gemm weights
    table = bench_deploy.format_report(report)
    assert "| ORT dynamic int8 |" in table and "ComplexNetwork, 3x32x32" in table


def test_models_report_rows_and_profiles():
    from torchfast.bench import models as bm

    rows, prof = bm.inference_report(batch=2, size=16, rounds=1, with_onnx=False)
    assert [r["impl"] for r in rows] == ["plain eager", "plain eager, channels_last input", "torchfast"]
    assert rows[0]["vs_plain"] == 1.0 and all(r["median_ms"] > 0 for r in rows)
    assert prof and all(0 < share <= 1 for _, share, _ in prof)
    rows, prof, copy_share = bm.train_report(batch=2, size=16, rounds=1)
    assert rows[1]["impl"] == "torchfast + torchfast AdamW" and 0 <= copy_share < 1
    assert "%" in bm.format_profile("x", prof) and "| train step" in bm.format_rows(rows)


def test_sharded_report_times_every_implementation_and_counts_collectives():
    import torch
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    from torchfast.bench import sharded as bench_sharded

    report = bench_sharded.sharded_report(nproc=2, rounds=1, warmup=0, kinds=("adamw", "sgd_momentum"))
    rows = report["rows"]
    assert report["world_size"] == 2
    whats = {(r["what"], r["impl"]) for r in rows}
    for what in ("adamw step", "sgd_momentum step"):
        assert {(what, impl) for impl in ("torch-foreach", "torch-fused", "torchfast")} <= whats
    for r in rows:
        if r["impl"] == "torchfast":
            assert r["median_ms"] > 0 and r["local_params"] > 0
        if r["what"] in ("clip_grad_norm_", "clip + adamw step") and r["impl"] == "torchfast":
            assert r["collectives"] == 1  # one all-reduce for the whole norm, not one per tensor
    assert "| clip_grad_norm_ | resnet18 | torchfast |" in bench_sharded.format_table(rows)


def test_report_writes_results_and_one_plot_per_suite(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    folder = tmp_path / "report"
    assert cli.main(["bench", "--suites", "optim", "clip", "--cases", "resnet18", "--optimizers", "adamw",
                     "--rounds", "2", "--report", str(folder)]) == 0
    text = (folder / "RESULTS.md").read_text()
    for needed in ("torch " + __import__("torch").__version__, "commit ", "command: `torchfast bench --suites optim clip",
                   "## CPU figures", "### optim", "![optim](optim.png)", "### clip", "| adamw | resnet18 (62 tensors) |"):
        assert needed in text, needed
    for suite in ("optim", "clip"):
        png = (folder / f"{suite}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "report: " in capsys.readouterr().out


def test_timings_band_brackets_the_per_round_ratio():
    from torchfast.bench.timing import Timings

    t = Timings({"a": [1.0, 2.0, 3.0, 4.0, 5.0], "base": [1.0, 1.0, 1.0, 1.0, 1.0]})
    assert t["a"] == 3.0 and t.band("a", "base") == (2.0, 4.0) and t.band("base", "base") == (1.0, 1.0)


def test_plot_takes_a_band_that_misses_the_ratio(tmp_path):
    pytest.importorskip("matplotlib")
    from torchfast.bench import report, suites
    suite = suites.Suite("x", plot_rows=[("a: torchfast", 0.5, (0.6, 0.7), "torch"), ("b: torch", 1.2, (0.9, 1.1), "torch"),
                                         ("c: torchfast", 0.8, None, "torch")])
    assert report.plot(suite, str(tmp_path / "x.png"), "CPU")
    assert (tmp_path / "x.png").stat().st_size > 1000
