"""Helpers shared by the op families' Python faces."""
from __future__ import annotations

import torch

from torchfast import _loader


def compiled_op(name: str):
    """The compiled operator torch.ops.torchfast.<name> (only call when _loader.has_kernel says so)."""
    return getattr(torch.ops.torchfast, name)


def _schema_registered(name: str) -> bool:
    try:
        getattr(torch.ops.torchfast, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def register_fake_if_compiled(name: str):
    """torch.library.register_fake for torchfast::<name>, when the library (and so its schema) is loaded."""
    def wrap(fn):
        if _loader.STATE.loaded and _schema_registered(name):
            torch.library.register_fake(f"torchfast::{name}")(fn)
        return fn
    return wrap
