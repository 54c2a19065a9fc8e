"""The cheat sheet's debugging tools: parameter counts, activations captured with forward hooks
(removed afterwards), and a memory report."""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
from torch import nn


def count_parameters(model: nn.Module) -> dict:
    """{"total", "trainable", "per_module": {name: count of its own parameters}}."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_module = {name or "(root)": sum(p.numel() for p in m.parameters(recurse=False))
                  for name, m in model.named_modules()}
    return {"total": total, "trainable": trainable, "per_module": {k: v for k, v in per_module.items() if v}}


@contextlib.contextmanager
def capture_activations(model: nn.Module, names: Optional[Iterable[str]] = None):
    """Within the block, records each named submodule's output (detached) into the yielded dict;
    the hooks are removed on exit, also on error. names: the submodules to watch (default: all leaves)."""
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, m in modules.items() if n and not any(True for _ in m.children())]
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"no submodule named {missing}; some names: {list(modules)[:10]}")
    captured: dict = {}
    handles = []
    for name in names:
        def hook(_module, _inputs, output, name=name):
            captured[name] = output.detach() if isinstance(output, torch.Tensor) else output
        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def memory_report(model: Optional[nn.Module] = None, device=None) -> dict:
    """Bytes held by the model's parameters, gradients and buffers, and on CUDA the allocator's
    current and peak allocation."""
    report: dict = {}
    if model is not None:
        report["parameters"] = sum(p.numel() * p.element_size() for p in model.parameters())
        report["gradients"] = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                                  if p.grad is not None)
        report["buffers"] = sum(b.numel() * b.element_size() for b in model.buffers())
    device = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        report["cuda_allocated"] = torch.cuda.memory_allocated(device)
        report["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(device)
        report["cuda_reserved"] = torch.cuda.memory_reserved(device)
    return report
