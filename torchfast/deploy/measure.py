"""Measuring deployed variants of one model side by side: latency (interleaved rounds, medians),
size and accuracy, as one table. Used by `torchfast export` and benchmarks/bench_deploy.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn


@dataclass
class Variant:
    name: str
    run: Callable  # tensors in, logits out
    size_bytes: int


def model_bytes(model: nn.Module) -> int:
    """Bytes of a torch model's parameters and buffers (what its state_dict saves)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def accuracy(run: Callable, loader: Iterable) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((run(x).argmax(-1) == y).sum())
            total += y.numel()
    return correct / max(total, 1)


def latencies(variants: list, inputs: tuple, rounds: int = 15, warmup: int = 2) -> dict:
    """Median seconds per call of each variant on `inputs`, the variants taking turns each round
    (so that the machine's noise falls on all of them alike)."""
    from torchfast.bench.timing import interleaved_medians

    with torch.no_grad():
        return interleaved_medians({v.name: (lambda v=v: v.run(*inputs)) for v in variants}, "cpu", rounds, warmup)


def compare(variants: list, inputs_by_batch: dict, loader: Optional[Iterable] = None, rounds: int = 15) -> list:
    """One row per variant: {"variant", "size_mb", "accuracy", "ms@<b>", "x@<b>", "band@<b>"} where x is
    the latency relative to the first variant (the baseline) at that batch size and band the 25-75%
    range of that ratio round by round."""
    rows = [{"variant": v.name, "size_mb": v.size_bytes / 1e6} for v in variants]
    for b, inputs in inputs_by_batch.items():
        t = latencies(variants, inputs, rounds=rounds)
        base = t[variants[0].name]
        for row, v in zip(rows, variants):
            row[f"ms@{b}"] = t[v.name] * 1e3
            row[f"x@{b}"] = t[v.name] / base
            row[f"band@{b}"] = t.band(v.name, variants[0].name)
    if loader is not None:
        for row, v in zip(rows, variants):
            row["accuracy"] = accuracy(v.run, loader)
    return rows


def format_table(rows: list, title: str = "") -> str:
    batches = [k[3:] for k in rows[0] if k.startswith("ms@")]
    head = ["variant"] + [f"batch {b} ms (x)" for b in batches] + ["size MB", "size x"] + \
        (["accuracy"] if "accuracy" in rows[0] else [])
    base_size = rows[0]["size_mb"]
    lines = [title] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"]] + [f"{r[f'ms@{b}']:.2f} ({r[f'x@{b}']:.2f}x)" for b in batches]
        cells += [f"{r['size_mb']:.3f}", f"{r['size_mb'] / base_size:.2f}x"]
        if "accuracy" in r:
            cells.append(f"{100 * r['accuracy']:.2f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
