"""Checkpoints that are never half-written and load safely.

save_checkpoint writes to a temporary file in the target's folder, flushes it to disk and renames it
over the target (an atomic replace on POSIX), so a crash leaves the old checkpoint or the new one,
never a torn file. load_checkpoint uses torch.load(weights_only=True) and turns a corrupt or foreign
file into an error that names it.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import numpy as np
import torch

FORMAT = "torchfast.checkpoint/1"


def save_checkpoint(state: dict, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict:
    """The checkpoint at `path`; for a sharded checkpoint (a directory, train/fsdp.py) the Trainer state
    beside its model and optimizer shards."""
    for folder in (path, path + ".old"):  # .old: where a sharded checkpoint's swap may have left it
        if os.path.isdir(folder):
            path = os.path.join(folder, "trainer.pt")
            break
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt, or holding objects weights_only refuses
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise RuntimeError(f"checkpoint {path!r} is corrupt or not a torchfast checkpoint ({type(e).__name__}: "
                           f"{first_line})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise RuntimeError(f"checkpoint {path!r} is not a torchfast checkpoint (format {found!r}, expected {FORMAT!r})")
    return state


def rng_state() -> dict:
    """Every RNG a training run draws from, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x):
    # random.setstate wants tuples; a round trip through torch.save may hand back lists
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
