"""What the fused optimizers share: torch.optim compatibility (param_group keys, state_dict
layout, loading torch's checkpoints), the learning-rate argument and the GradScaler protocol."""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from torchfast.ops import clip as clip_ops
from torchfast.reference.clip import clip_coefficient
from torchfast.sharded import dtensor as sharded


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


def check_max_grad_norm(max_grad_norm) -> None:
    if max_grad_norm is not None and not float(max_grad_norm) > 0.0:
        raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm} (must be > 0, or None for no clipping)")


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


def _outside_dynamo(name: str):
    """torch.optim.Optimizer.<name> without torch._disable_dynamo's wrapper outside compiled code.

    torch wraps state_dict, load_state_dict, zero_grad and add_param_group (called by __init__) in
    torch._disable_dynamo, whose first call imports torch._dynamo: 1.2-1.6 s measured here, paid by
    every process that builds an optimizer, compiled or not. Eager callers get the undecorated
    method (what the wrapper itself runs); inside a compiled region torch's own wrapper runs."""
    decorated = getattr(torch.optim.Optimizer, name)
    undecorated = getattr(decorated, "__wrapped__", decorated)

    @functools.wraps(undecorated)
    def method(self, *args, **kwargs):
        fn = decorated if torch.compiler.is_compiling() else undecorated
        return fn(self, *args, **kwargs)

    return method


class FusedOptimizer(torch.optim.Optimizer):
    """Base of torchfast's optimizers: a torch.optim.Optimizer whose step runs one fused op per group.

    GradScaler protocol (`_step_supports_amp_scaling`): torch.amp.GradScaler sets `grad_scale` and
    `found_inf` on the optimizer before `step()`; the kernels unscale the grads in the same pass and
    skip the whole step when found_inf is non-zero, with no host sync on CUDA. The ordinary order
    (scaler.unscale_(opt); clip; scaler.step(opt)) works too.

    Clipping folded into the step (`max_grad_norm`, per param group): one pass computes the group's
    gradient 2-norm (of the unscaled grads), and the update multiplies each grad by
    min(max_grad_norm / (norm + 1e-6), 1) on the fly, as clip_grad_norm_ followed by the step would,
    without a separate scaling pass. The grads keep their unclipped values (unscaled in place under
    a scaler, as torch's fused optimizers do). `last_grad_norms[i]` is group i's norm at the last
    step (a device tensor, None where the group does not clip); `last_grad_norm` is the norm over
    all clipped groups. Non-finite norms follow clip_grad_norm_: without a scaler an inf norm zeroes
    the update's grads and NaN stays NaN; under a scaler the step is skipped.
    """

    _step_supports_amp_scaling = True
    last_grad_norms: list

    add_param_group = _outside_dynamo("add_param_group")
    zero_grad = _outside_dynamo("zero_grad")
    state_dict = _outside_dynamo("state_dict")
    _load_state_dict = _outside_dynamo("load_state_dict")

    @property
    def last_grad_norm(self) -> Optional[Tensor]:
        norms = [n for n in getattr(self, "last_grad_norms", []) if n is not None]
        if not norms:
            return None
        if len(norms) == 1:
            return norms[0]
        return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._fix_loaded_state()

    @functools.wraps(torch.optim.Optimizer.load_state_dict)
    def load_state_dict(self, state_dict) -> None:
        self._load_state_dict(state_dict)
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
        self.last_grad_norms = [None] * len(self.param_groups)
        for i, group in enumerate(self.param_groups):
            self._step_group(i, group, grad_scale, found_inf)
        return loss

    def _step_group(self, index: int, group, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        raise NotImplementedError

    def _clip_coef(self, index: int, group, grads: list[Tensor], grad_scale: Optional[Tensor],
                   sharded_grads: Optional[list[Tensor]] = None) -> Optional[Tensor]:
        """The clip coefficient for `group` (a device tensor), or None when it does not clip.

        `grads` are what the kernel updates (local shards); `sharded_grads`, when the group holds
        DTensors, the same grads as DTensors: their norm is the local pass plus one all-reduce."""
        max_norm = group.get("max_grad_norm")
        if max_norm is None or not grads:
            return None
        # fp32 even for fp16 grads (no overflow); fp64 for fp64 grads, as clip_grad_norm_ computes it
        dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
        if sharded_grads is not None:
            norm = sharded.total_norm(sharded_grads, 2.0, dtype, clip_ops.total_norm)
        else:
            norm = clip_ops.total_norm(grads, 2.0, dtype)
        if grad_scale is not None:
            norm = norm / grad_scale.to(device=norm.device, dtype=norm.dtype)
        self.last_grad_norms[index] = norm
        return clip_coefficient(norm, float(max_norm))

    def _check_dtensor(self, p: Tensor) -> None:
        sharded.check_placements(p, f"torchfast.optim.{type(self).__name__}")

    def _reject_sparse(self, p: Tensor) -> None:
        raise RuntimeError(
            f"torchfast.optim.{type(self).__name__} does not support sparse gradients (got one for a parameter "
            f"of shape {tuple(p.shape)}); use torch.optim.SparseAdam for sparse parameters")
