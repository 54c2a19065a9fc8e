"""Drop-in fused Adam and AdamW: same arguments, param_groups and state_dict as torch.optim."""
from __future__ import annotations

import torch

from torchfast.ops import optim as ops
from torchfast.sharded.dtensor import is_dtensor, local
from torchfast.optim._base import (FusedOptimizer, check_lr, check_max_grad_norm, check_unsupported, lr_arguments,
                                   scalar_dtype)


class Adam(FusedOptimizer):
    """torch.optim.Adam with every parameter of a group updated by one fused kernel call.

    State per parameter, as torch.optim.Adam keeps it: `step` (a float32 scalar tensor on the
    parameter's device), `exp_avg`, `exp_avg_sq` and, with amsgrad, `max_exp_avg_sq`.
    `foreach`, `fused` and `capturable` are accepted and kept in the param groups for state_dict
    compatibility; the step is always the fused one. `max_grad_norm` (torchfast's own, per group)
    folds gradient-norm clipping into the step: see FusedOptimizer.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, max_grad_norm=None):
        check_lr(lr)
        check_max_grad_norm(max_grad_norm)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        check_unsupported(type(self).__name__, differentiable)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        if max_grad_norm is not None:  # only then: torch.optim's param_group keys otherwise
            defaults["max_grad_norm"] = max_grad_norm
        super().__init__(params, defaults)

    def _group_tensors(self, group):
        """The op's lists for the params of `group` that have a grad (state created on first use), and
        the grads as the params hold them (DTensors under FSDP2, for the clipping norm) or None when
        none is a DTensor. DTensor params enter the op as their local shards.

        One pass, bound methods hoisted: with thousands of parameters this loop is a visible part of
        the step."""
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
        sharded_grads = None
        amsgrad = group["amsgrad"]
        state_of = self.state
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                self._reject_sparse(p)
            state = state_of[p]
            if not state:
                self._init_state(state, p)
            if amsgrad and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if is_dtensor(p):
                if sharded_grads is None:
                    sharded_grads = list(grads)  # the plain grads seen so far
                sharded_grads.append(grad)
                self._check_dtensor(p)
                p, grad = p._local_tensor, local(grad)
                exp_avgs.append(local(state["exp_avg"]))
                exp_avg_sqs.append(local(state["exp_avg_sq"]))
                if amsgrad:
                    max_exp_avg_sqs.append(local(state["max_exp_avg_sq"]))
            else:
                if sharded_grads is not None:
                    sharded_grads.append(grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                if amsgrad:
                    max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            params.append(p)
            grads.append(grad)
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, sharded_grads

    @staticmethod
    def _init_state(state, p):
        state["step"] = torch.zeros((), dtype=scalar_dtype(), device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _step_group(self, index, group, grad_scale, found_inf):
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, sharded_grads = self._group_tensors(group)
        if not params:
            return
        clip_coef = self._clip_coef(index, group, grads, grad_scale, sharded_grads)
        lr, lr_tensor = lr_arguments(group["lr"], params[0].device)
        beta1, beta2 = group["betas"]
        ops.fused_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=lr, beta1=float(beta1),
                        beta2=float(beta2), weight_decay=float(group["weight_decay"]), eps=float(group["eps"]),
                        amsgrad=bool(group["amsgrad"]), maximize=bool(group["maximize"]),
                        decoupled_weight_decay=bool(group.get("decoupled_weight_decay", False)),
                        lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef)


class AdamW(Adam):
    """torch.optim.AdamW (Adam with decoupled weight decay, default weight_decay=1e-2), fused."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 max_grad_norm=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=True, max_grad_norm=max_grad_norm)
