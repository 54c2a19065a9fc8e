"""What the fused optimizers share: torch.optim compatibility (param_group keys, state_dict
layout, loading torch's checkpoints), the learning-rate argument and the GradScaler protocol."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def scalar_dtype() -> torch.dtype:
    """dtype of the `step` counters, as torch.optim chooses it."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def check_lr(lr) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        lr = float(lr.detach().cpu())
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_unsupported(name: str, differentiable: bool) -> None:
    if differentiable:
        raise ValueError(f"torchfast.optim.{name} does not support differentiable=True; use torch.optim.{name}")


def lr_arguments(lr, device: torch.device) -> tuple[float, Optional[Tensor]]:
    """(lr as a float, lr as a device tensor or None). A CPU tensor is read directly; a tensor on the
    params' device is passed through so that the CUDA kernel reads it without a host sync."""
    if isinstance(lr, Tensor):
        if lr.device.type == "cpu" or lr.device != device:
            return float(lr), None
        return 0.0, lr
    return float(lr), None


class FusedOptimizer(torch.optim.Optimizer):
    """Base of torchfast's optimizers: a torch.optim.Optimizer whose step runs one fused op per group.

    GradScaler protocol (`_step_supports_amp_scaling`): torch.amp.GradScaler sets `grad_scale` and
    `found_inf` on the optimizer before `step()`; the kernels unscale the grads in the same pass and
    skip the whole step when found_inf is non-zero, with no host sync on CUDA.
    """

    _step_supports_amp_scaling = True

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._fix_loaded_state()

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._fix_loaded_state()

    def _fix_loaded_state(self) -> None:
        """torch.optim's non-fused optimizers keep `step` on the CPU (or as a Python number in old
        checkpoints); the fused kernels want it on the parameter's device."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "step" not in state:
                    continue
                step = state["step"]
                if not isinstance(step, Tensor):
                    step = torch.tensor(float(step), dtype=scalar_dtype())
                if step.device != p.device or step.dtype not in (torch.float32, torch.float64):
                    step = step.to(device=p.device, dtype=torch.float32)
                state["step"] = step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Set by torch.amp.GradScaler.step() for the duration of this call (see the class docstring).
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group in self.param_groups:
            self._step_group(group, grad_scale, found_inf)
        return loss

    def _step_group(self, group, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        raise NotImplementedError

    def _reject_sparse(self, p: Tensor) -> None:
        raise RuntimeError(
            f"torchfast.optim.{type(self).__name__} does not support sparse gradients (got one for a parameter "
            f"of shape {tuple(p.shape)}); use torch.optim.SparseAdam for sparse parameters")
