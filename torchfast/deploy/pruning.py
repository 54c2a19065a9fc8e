"""torchfast.deploy.prune: magnitude pruning through torch.nn.utils.prune, with a sparsity report.

Global L1 unstructured pruning (the cheat sheet's `prune.global_unstructured`) or Ln structured
pruning of whole output channels per layer. torchfast's fused layers read the pruned weights on
their fused paths (weight_orig * weight_mask while reparametrised; their folded inference weights
are refolded when the mask or the weights change).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

METHODS = ("l1_unstructured", "ln_structured")


@dataclass
class PruneReport:
    method: str
    amount: float
    layers: dict  # module path -> (zeros, numel)
    skipped: dict  # module path -> why it was left alone

    @property
    def zeros(self) -> int:
        return sum(z for z, _ in self.layers.values())

    @property
    def numel(self) -> int:
        return sum(n for _, n in self.layers.values())

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def __str__(self) -> str:
        lines = [f"{self.method} amount={self.amount:g}: {self.zeros}/{self.numel} weights zero "
                 f"({100 * self.sparsity:.1f}%) over {len(self.layers)} layers"]
        lines += [f"  {name:<32} {100 * z / max(n, 1):5.1f}% of {n}" for name, (z, n) in self.layers.items()]
        lines += [f"  {name:<32} left alone: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _targets(model: nn.Module, layers: tuple, method: str, exclude: Iterable[str]):
    exclude = set(exclude)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, layers) and name not in exclude]
    skipped = {name: "excluded" for name in exclude}
    if method == "ln_structured" and exclude == set():
        # Removing output channels of the last layer would remove outputs (classes): keep it whole.
        # The head: the last Linear registered outside attention modules (their out_proj is internal).
        inside_attention = {f"{name}.{child}" for name, m in model.named_modules()
                            if isinstance(m, nn.MultiheadAttention) for child, _ in m.named_modules() if child}
        heads = [name for name, m in found if isinstance(m, nn.Linear) and name not in inside_attention]
        if heads:
            skipped[heads[-1]] = "the model's last Linear (its output channels are the model's outputs)"
            found = [(n, m) for n, m in found if n != heads[-1]]
    return found, skipped


def prune(model: nn.Module, amount: float, *, method: str = "l1_unstructured",
          layers: tuple = (nn.Conv2d, nn.Linear), make_permanent: bool = True, n: int = 2, dim: int = 0,
          exclude: Optional[Iterable[str]] = None) -> PruneReport:
    """Prunes the weights of every module of the `layers` types in `model` in place.

    method="l1_unstructured": the `amount` (fraction, or a count if an int) of smallest-magnitude
    weights over all those layers together (torch.nn.utils.prune.global_unstructured);
    "ln_structured": per layer, the `amount` of output channels (dim 0) with the smallest Ln norm
    (torch.nn.utils.prune.ln_structured), the last Linear excepted unless `exclude` is given.
    `make_permanent` removes the reparametrisation (prune.remove): the weights become plain
    parameters again, so the model exports, quantizes and saves as an unpruned one would.
    Returns the per-layer sparsity report."""
    if method not in METHODS:
        raise ValueError(f"prune: method must be one of {METHODS}, got {method!r}")
    if isinstance(amount, float) and not 0.0 <= amount <= 1.0 or isinstance(amount, int) and amount < 0:
        raise ValueError(f"prune: amount must be a fraction in [0, 1] or a non-negative count, got {amount!r}")
    targets, skipped = _targets(model, tuple(layers), method, exclude or ())
    if not targets:
        raise ValueError(f"prune: no {', '.join(t.__name__ for t in layers)} layer with a weight in the model")
    for _, m in targets:
        # torch.nn.utils.prune flattens weights with .view(-1), which a channels_last weight refuses:
        # pruned in the default layout, put back in the model's own by make_permanent_
        w = m._parameters.get("weight")
        if isinstance(w, torch.Tensor) and not w.is_contiguous():
            w.data = w.data.contiguous()
    if method == "l1_unstructured":
        torch_prune.global_unstructured([(m, "weight") for _, m in targets],
                                        pruning_method=torch_prune.L1Unstructured, amount=amount)
    else:
        for _, m in targets:
            torch_prune.ln_structured(m, "weight", amount=amount, n=n, dim=dim)
    if make_permanent:
        make_permanent_(model)
    report = {}
    for name, m in targets:
        w = m.weight
        report[name] = (int((w == 0).sum()), w.numel())
    return PruneReport(method=method, amount=amount, layers=report, skipped=skipped)


def make_permanent_(model: nn.Module) -> nn.Module:
    """Removes every torch.nn.utils.prune reparametrisation in `model` (after fine-tuning a model
    pruned with make_permanent=False): the pruned weights become plain parameters again."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                torch_prune.remove(module, hook._tensor_name)
    for module in model.modules():  # the weight layout a torchfast model keeps (channels_last on the CPU)
        restore = getattr(module, "_set_conv_weight_layout", None)
        if callable(restore):
            restore()
    return model


def sparsity(model: nn.Module, layers: tuple = (nn.Conv2d, nn.Linear)) -> float:
    """Fraction of zero weights over the `layers` modules of `model`."""
    with torch.no_grad():
        ws = [m.weight for m in model.modules() if isinstance(m, layers)]
        total = sum(w.numel() for w in ws)
        return sum(int((w == 0).sum()) for w in ws) / total if total else 0.0
