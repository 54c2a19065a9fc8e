"""Whole-model layout plan for models torchfast.convert rewrote: in CPU inference (no gradient
recorded: torch.no_grad / inference_mode) the network runs channels_last inside, converting its
input once and its 4-D outputs back once.

Why: oneDNN's convolutions (with the folded batch norms, pre-packed weights and ReLU / add post-ops
torchfast gives them) and max pooling are faster on channels_last activations; an NCHW input keeps
the whole network on the slower NCHW paths (measured on ResNet-18, batch 16, 64x64: max pooling
5.6 ms NCHW against 0.4 ms channels_last; the whole inference 0.91x eager NCHW, 0.77x with the plan).
In training the NCHW plan measured faster for converted models, so the plan is inference only.

A tensor's values do not depend on its memory layout, but some code does: `.view` refuses a
channels_last tensor it would flatten across dims, and `.stride()` / `.data_ptr()` see the
difference. The plan is therefore installed only when every forward the input reaches is known:
the model's own and its blocks' forwards are traced (torch.fx), each call is a torch op other than
those, and each leaf module is one of torch's layout-agnostic layers or a torchfast fused one.
Installed as a forward pre-hook and a forward hook on the model, module-level functions, so a
converted model still pickles, copies and state_dicts as before.
"""
from __future__ import annotations

import builtins
import math
import operator
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from torchfast.nn import attention as fused_attention
from torchfast.nn import layers as fused
from torchfast.nn.absorbed import AbsorbedReLU
from torchfast.nn.conv import Conv2d as PackedConv2d
from torchfast.nn.pooling import ReLUMaxPool2d
from torchfast.nn.sequential import FusedSequential
from torchfast.ops._registry import exporting

__all__ = ["graph_of", "install", "layout_safe"]

# torch's layers whose forward gives the same values for any input layout and never views across dims.
_SAFE_MODULES = frozenset({
    nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten, nn.Linear,
    fused.BatchNormReLU2d, fused.BatchNormAddReLU2d, fused.SyncBatchNormReLU2d, fused.SyncBatchNormAddReLU2d,
    fused.ConvBNReLU2d, fused.ResidualBlock, fused_attention.MultiheadAttention, ReLUMaxPool2d,
    PackedConv2d, AbsorbedReLU,
})

# Tensor methods (and torch functions) whose result depends on the layout or that refuse a layout.
_LAYOUT_BOUND = frozenset({"view", "view_as", "stride", "is_contiguous", "data_ptr", "as_strided", "as_strided_",
                           "numpy", "storage", "untyped_storage", "storage_offset", "set_", "resize_",
                           "resize_as_", "unsafe_view", "__array__"})

_PLAIN_MODULES = (operator, builtins, math)


class _EveryModuleALeaf(torch.fx.Tracer):
    """Traces one forward only: each submodule call stays a call (it is checked on its own)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def graph_of(module: nn.Module) -> Optional[torch.fx.Graph]:
    """`module`'s own forward as a torch.fx graph (each submodule call one node), or None where it
    does not trace."""
    if isinstance(module, torch.fx.GraphModule):
        return module.graph
    try:
        return _EveryModuleALeaf().trace(module)
    except Exception:  # data-dependent control flow and the like: not known, so not safe
        return None


def _call_safe(target) -> bool:
    name = getattr(target, "__name__", "")
    if name in _LAYOUT_BOUND:
        return False
    owner = getattr(target, "__module__", None) or ""
    return owner.startswith(("torch", "torchfast")) or any(owner in (m.__name__, "_" + m.__name__)
                                                            for m in _PLAIN_MODULES)


def layout_safe(module: nn.Module, _seen: Optional[dict] = None) -> bool:
    """Whether running `module` on a channels_last input gives what an NCHW input gives, as far as
    its traced forward(s) show (see the module docstring)."""
    seen = {} if _seen is None else _seen
    if id(module) in seen:
        return seen[id(module)]
    seen[id(module)] = False  # a module that reaches itself is not proven
    if type(module) in _SAFE_MODULES:
        ok = True
    elif type(module) in (nn.Sequential, FusedSequential):
        ok = all(layout_safe(m, seen) for m in module)
    elif type(module).__module__.startswith("torch.") and not isinstance(module, torch.fx.GraphModule):
        ok = False  # torch's other layers: not vetted
    else:
        graph = graph_of(module)
        ok = graph is not None and _graph_safe(graph, module, seen)
    seen[id(module)] = ok
    return ok


def _graph_safe(graph: torch.fx.Graph, owner: nn.Module, seen: dict) -> bool:
    for node in graph.nodes:
        if node.op == "call_module":
            if not layout_safe(owner.get_submodule(node.target), seen):
                return False
        elif node.op == "call_method":
            if node.target in _LAYOUT_BOUND:
                return False
        elif node.op == "call_function":
            if not _call_safe(node.target):
                return False
    return True


# -- the hooks ----------------------------------------------------------------------------------------

_MARK = "_torchfast_planned_from_nchw"  # set on the channels_last copy of the input: convert back


def _plan_applies(module: nn.Module, x) -> bool:
    # No gradient recorded is what decides (not module.training: a container's own flag says nothing
    # about its layers'; the fused layers fold their batch norms only in eval mode anyway).
    return (isinstance(x, Tensor) and not torch.is_grad_enabled()
            and x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.bfloat16)
            and x.size(1) > 1 and x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
            and not torch.is_autocast_enabled("cpu") and not exporting())


def _enter(module: nn.Module, args):
    if torch.compiler.is_compiling() or not args or not _plan_applies(module, args[0]):
        return None  # (compiled: inductor plans layouts itself)
    x = args[0].contiguous(memory_format=torch.channels_last)
    setattr(x, _MARK, True)
    return (x,) + tuple(args[1:])


def _back_to_nchw(t):
    if isinstance(t, Tensor) and t.dim() == 4 and not t.is_contiguous() and \
            t.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous()
    return t


def _leave(module: nn.Module, args, output):
    # `args` as forward saw them: the marked copy iff _enter converted this call's input
    if torch.compiler.is_compiling() or not args or not getattr(args[0], _MARK, False):
        return None
    return tree_map(_back_to_nchw, output)


def install(model: nn.Module) -> Optional[str]:
    """Install the plan on `model` when its forward is proven layout-safe; returns why not, or None."""
    if any(h is _enter for h in model._forward_pre_hooks.values()):
        return None  # converted twice: planned already
    if not layout_safe(model):
        return ("its forward (or a block's) does not trace, calls a layout-bound op (view, stride, ...) "
                "or a layer not known to be layout-agnostic")
    model.register_forward_pre_hook(_enter)
    model.register_forward_hook(_leave)
    return None
