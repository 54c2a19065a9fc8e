"""The first-call measurement the measured convolution paths share (`_onednn`'s inference paths,
`_train_conv`'s training ones), as cudnn.benchmark does for cuDNN's algorithms."""
from __future__ import annotations

import math
import time


def fastest(paths: dict, rounds: int) -> tuple:
    """(name, results): the fastest of `paths` ({name: call}) -- each called once to warm up (packing,
    primitive set-up), then `rounds` times interleaved, by its best time -- and each path's last result."""
    results = {name: path() for name, path in paths.items()}
    best = {name: math.inf for name in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            start = time.perf_counter()
            results[name] = path()
            best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.get), results
