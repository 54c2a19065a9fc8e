"""Drop-in fused SGD: same arguments, param_groups and state_dict as torch.optim.SGD."""
from __future__ import annotations

import torch

from torchfast.ops import optim as ops
from torchfast.sharded.dtensor import is_dtensor, local
from torchfast.optim._base import FusedOptimizer, check_lr, check_max_grad_norm, check_unsupported, lr_arguments


class SGD(FusedOptimizer):
    """torch.optim.SGD with every parameter of a group updated by one fused kernel call.

    State per parameter, as torch.optim.SGD keeps it: `momentum_buffer` when momentum != 0 (created
    from the first gradient, as torch does).
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, max_grad_norm=None):
        check_lr(lr)
        check_max_grad_norm(max_grad_norm)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"Nesterov momentum requires a momentum and zero dampening "
                             f"(got momentum={momentum}, dampening={dampening})")
        check_unsupported(type(self).__name__, differentiable)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused)
        if max_grad_norm is not None:  # only then: torch.optim's param_group keys otherwise
            defaults["max_grad_norm"] = max_grad_norm
        super().__init__(params, defaults)

    def _step_group(self, index, group, grad_scale, found_inf):
        momentum = float(group["momentum"])
        # One pass: params with a momentum buffer take the ordinary update; the others (first
        # step, or a param that had no grad until now) start their buffer from the gradient.
        # DTensor params (FSDP2) enter the kernel as their local shards; their grads as DTensors are
        # kept for the clipping norm (`sharded_grads`, None while the group holds none).
        ongoing, ongoing_grads, buffers, starting, starting_grads = [], [], [], [], []
        sharded_grads, starting_params = None, []
        state_of = self.state
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                self._reject_sparse(p)
            buf = state_of[p].get("momentum_buffer") if momentum != 0 else None
            if is_dtensor(p):
                if sharded_grads is None:
                    sharded_grads = ongoing_grads + starting_grads
                sharded_grads.append(grad)
                self._check_dtensor(p)
            elif sharded_grads is not None:
                sharded_grads.append(grad)
            if buf is None and momentum != 0:
                starting_params.append(p)
                starting.append(local(p))
                starting_grads.append(local(grad))
            else:
                ongoing.append(local(p))
                ongoing_grads.append(local(grad))
                if buf is not None:
                    buffers.append(local(buf))
        if not ongoing and not starting:
            return
        lr, lr_tensor = lr_arguments(group["lr"], (ongoing or starting)[0].device)
        clip_coef = self._clip_coef(index, group, ongoing_grads + starting_grads, grad_scale, sharded_grads)
        hyper = dict(lr=lr, momentum=momentum, dampening=float(group["dampening"]),
                     weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
                     maximize=bool(group["maximize"]), lr_tensor=lr_tensor, grad_scale=grad_scale,
                     found_inf=found_inf, clip_coef=clip_coef)
        if ongoing:
            ops.fused_sgd_(ongoing, ongoing_grads, buffers, is_first_step=False, **hyper)
        # A skipped AMP step must not leave uninitialised buffers behind: read found_inf on the host
        # here, which syncs only on the steps that create buffers (normally the first).
        if starting and not (found_inf is not None and bool(found_inf)):
            new_buffers = [torch.empty_like(p, memory_format=torch.preserve_format) for p in starting_params]
            ops.fused_sgd_(starting, starting_grads, [local(b) for b in new_buffers], is_first_step=True, **hyper)
            for p, buf in zip(starting_params, new_buffers):
                state_of[p]["momentum_buffer"] = buf
