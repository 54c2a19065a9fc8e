"""Timing shared by every benchmark suite: implementations timed round by round in turn, so that this
machine's noise hits them alike; medians, and per-round ratios for the noise band."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


class Timings(dict):
    """name -> median seconds, with each name's per-round times in `.rounds`."""

    def __init__(self, rounds: dict):
        super().__init__({name: statistics.median(ts) for name, ts in rounds.items()})
        self.rounds = rounds

    def band(self, name: str, baseline: str) -> tuple[float, float]:
        """The 25th and 75th percentiles of name's time over baseline's, round by round: the noise band
        around the ratio of medians."""
        ratios = sorted(a / b for a, b in zip(self.rounds[name], self.rounds[baseline]))
        if len(ratios) < 2:
            return ratios[0], ratios[0]
        q = statistics.quantiles(ratios, n=4, method="inclusive")
        return q[0], q[2]


def interleaved_medians(fns: dict, device, rounds: int, warmup: int,
                        before: Optional[Callable] = None) -> Timings:
    """Median seconds of each callable, timed round by round in turn (noise hits all alike);
    `before()` runs ahead of each call, untimed (a barrier, for ranks that must start together)."""
    cuda = torch.device(device).type == "cuda"
    times = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            if before is not None:
                before()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return Timings(times)


