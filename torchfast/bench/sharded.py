"""Sharded training benchmark: the optimizer step and gradient clipping under FSDP2 (`fully_shard`), torchfast
vs torch.optim's default (foreach) and fused steps, in N processes (torchrun, gloo on the CPU, nccl on GPUs).

Each rank holds the FSDP2 shards of a parameter set (ResNet-18's shapes by default) with gradients; every
implementation steps the same shards, interleaved round by round, with a barrier before each timed call so
the ranks start together. A row's time is the slowest rank's median (a sharded step is as fast as its slowest
rank). The clipping rows also count the collectives one clip issues (all-reduces: torch.distributed's and the
functional ones DTensor uses), to show that torchfast reduces the norm once per clip.

    torchfast bench --suites fsdp [--fsdp-nproc 2]          (prints the table)
    python -m torch.distributed.run --nproc_per_node=2 -m torchfast.bench.sharded --json OUT.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist
from torch import nn

import torchfast
from torchfast.bench import optim as cases
from torchfast.bench.timing import interleaved_medians


class _Shapes(nn.Module):
    def __init__(self, shapes, generator):
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(torch.randn(s, generator=generator)) for s in shapes])


def _sharded_params(case: str, device) -> list[nn.Parameter]:
    """The case's parameters sharded by fully_shard, each with a DTensor gradient placed like it."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    g = torch.Generator().manual_seed(0)
    module = _Shapes(cases.CASES[case](), g).to(device)
    fully_shard(module)
    params = list(module.parameters())
    for p in params:
        grad = torch.randn(p.shape, generator=g).to(device) * 1e-3
        p.grad = distribute_tensor(grad, p.device_mesh, p.placements)
    return params


@contextlib.contextmanager
def _counting_collectives():
    """Counts all-reduces issued: torch.distributed.all_reduce (torchfast) and the functional collectives
    DTensor's redistribution uses (torch's clip on DTensors)."""
    import torch.distributed._functional_collectives as funcol

    calls = []
    originals = {(dist, "all_reduce"): dist.all_reduce, (funcol, "all_reduce"): funcol.all_reduce}

    def counting(original):
        def wrapper(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)
        return wrapper

    for (module, name), original in originals.items():
        setattr(module, name, counting(original))
    try:
        yield calls
    finally:
        for (module, name), original in originals.items():
            setattr(module, name, original)


def _timed_rounds(fns: dict, device, rounds: int, warmup: int, prepare=None) -> dict:
    """This rank's median seconds per callable, interleaved, each call started together on all ranks
    (after `prepare()`, untimed)."""
    def before():
        if prepare is not None:
            prepare()
        dist.barrier()
    return interleaved_medians(fns, device, rounds, warmup, before=before)


def _collectives_per_call(fns: dict) -> dict:
    counts = {}
    for name, fn in fns.items():
        with _counting_collectives() as calls:
            fn()
        counts[name] = len(calls)
    return counts


def _slowest(medians: dict) -> dict:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, medians)
    return {name: max(m[name] for m in gathered) for name in medians}


def _step_rows(case, params, device, rounds, warmup, kinds):
    rows = []
    local = sum(p.to_local().numel() for p in params)
    for kind in kinds:
        opts, unsupported = {}, {}
        for impl in cases.IMPLS:
            opt = cases.make_optimizer(kind, impl, params)
            try:
                opt.step()  # torch's fused SGD has no DTensor sharding strategy (torch 2.14): say so, time the rest
            except NotImplementedError as e:
                unsupported[impl] = str(e).splitlines()[0]
                continue
            opts[impl] = opt
        med = _slowest(_timed_rounds({impl: opt.step for impl, opt in opts.items()}, device, rounds, warmup))
        for impl in cases.IMPLS:
            row = {"what": f"{kind} step", "case": case, "impl": impl, "local_params": local, "collectives": None}
            if impl in med:
                row.update(median_ms=med[impl] * 1e3, vs_foreach=med[impl] / med["torch-foreach"])
            else:
                row.update(median_ms=None, vs_foreach=None, error=unsupported[impl])
            rows.append(row)
        del opts
    return rows


def _clip_rows(case, params, device, rounds, warmup):
    grads = [p.grad for p in params]
    originals = [g.to_local().clone() for g in grads]

    def restore():  # each clip scales the grads: every call starts from the same ones (untimed)
        for g, o in zip(grads, originals):
            g.to_local().copy_(o)

    def clip(fn):
        return lambda: fn(params, 1e-4)

    fns = {"torch-foreach": clip(torch.nn.utils.clip_grad_norm_), "torchfast": clip(torchfast.nn.utils.clip_grad_norm_)}
    counts = _collectives_per_call(fns)
    med = _slowest(_timed_rounds(fns, device, rounds, warmup, prepare=restore))
    # the clipped AdamW step: torch's clip then its foreach step, vs the norm folded into torchfast's step
    torch_opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    ours = torchfast.optim.AdamW(params, lr=1e-4, max_grad_norm=1e-4)

    def torch_clipped():
        torch.nn.utils.clip_grad_norm_(params, 1e-4)
        torch_opt.step()

    step_fns = {"torch-foreach": torch_clipped, "torchfast": ours.step}
    step_counts = _collectives_per_call(step_fns)
    step_med = _slowest(_timed_rounds(step_fns, device, rounds, warmup, prepare=restore))
    local = sum(p.to_local().numel() for p in params)
    rows = []
    for what, m, c in (("clip_grad_norm_", med, counts), ("clip + adamw step", step_med, step_counts)):
        for impl in fns:
            rows.append({"what": what, "case": case, "impl": impl, "median_ms": m[impl] * 1e3, "local_params": local,
                         "vs_foreach": m[impl] / m["torch-foreach"], "collectives": c[impl]})
    return rows


def worker(case: str, rounds: int, warmup: int, kinds, out: str) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        params = _sharded_params(case, device)
        rows = _step_rows(case, params, device, rounds, warmup, kinds) + _clip_rows(case, params, device, rounds, warmup)
        if dist.get_rank() == 0:
            with open(out, "w") as f:
                json.dump({"rows": rows, "world_size": dist.get_world_size(), "device": str(device),
                           "torch": torch.__version__}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def sharded_report(nproc: int = 2, case: str = "resnet18", rounds: int = 10, warmup: int = 2,
                   kinds=("adamw", "sgd_momentum")) -> dict:
    """Runs the worker in `nproc` processes (torchrun) and returns rank 0's report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))}
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(torchfast.__file__)))
        env["PYTHONPATH"] = package_parent + os.pathsep + env.get("PYTHONPATH", "")
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={nproc}", "-m", "torchfast.bench.sharded", "--case", case,
                               "--rounds", str(rounds), "--warmup", str(warmup), "--kinds", *kinds, "--json", out],
                              capture_output=True, text=True, env=env, timeout=1800)
        if done.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"the sharded benchmark failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def format_table(rows) -> str:
    lines = ["| what | case | impl | median ms | local params | vs torch foreach | all-reduces per call |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        collectives = "" if r["collectives"] is None else str(r["collectives"])
        if r["median_ms"] is None:
            lines.append(f"| {r['what']} | {r['case']} | {r['impl']} | fails: {r['error']} | {r['local_params']:,} | "
                         f"| {collectives} |")
            continue
        lines.append(f"| {r['what']} | {r['case']} | {r['impl']} | {r['median_ms']:.2f} | {r['local_params']:,} | "
                     f"{r['vs_foreach']:.2f} | {collectives} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="resnet18", choices=list(cases.CASES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", default=["adamw", "sgd_momentum"], choices=list(cases.BYTES_PER_PARAM))
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    worker(args.case, args.rounds, args.warmup, args.kinds, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
