"""Sharded training: the optimizer step and clipping on FSDP2 shards (2 processes), torchfast vs
torch.optim foreach / fused, from torchfast.bench.sharded.

    pytest benchmarks/bench_sharded.py --benchmark-only

The steps run in other processes, so pytest-benchmark's own timing here is the whole two-process run;
each implementation's median (the slowest rank's) and the all-reduces per clip are in extra_info.
`torchfast bench --suites fsdp` prints the same rows as a table.
"""
from torchfast.bench import sharded as bench_sharded


def test_sharded_step_and_clip(benchmark):
    report = {}
    benchmark.group = "FSDP2 shards, 2 processes"
    benchmark.pedantic(lambda: report.update(bench_sharded.sharded_report(nproc=2, rounds=5)), rounds=1,
                       iterations=1)
    for row in report["rows"]:
        key = f"{row['what']} / {row['impl']}"
        benchmark.extra_info[key + " ms"] = None if row["median_ms"] is None else round(row["median_ms"], 3)
        if row["collectives"] is not None:
            benchmark.extra_info[key + " all-reduces"] = row["collectives"]
