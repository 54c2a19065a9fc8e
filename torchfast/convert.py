"""torchfast.convert(model): torchfast's fused layers in a model we did not write, where they are
provably the same computation, and nothing else changed.

What it rewrites (state_dict keys and values unchanged; each swap and each candidate left alone is
reported):
- nn.MultiheadAttention -> torchfast.nn.MultiheadAttention (same parameters; a subclass);
- BatchNorm2d followed by ReLU in an nn.Sequential, or as module calls in any other traced forward (a
  model's own) -> BatchNormReLU2d (the ReLU becomes torchfast.nn.AbsorbedReLU, an identity);
- an nn.Sequential with Conv2d -> BatchNorm2d pairs -> torchfast.nn.FusedSequential, which folds each
  pair in inference;
- an nn.ReLU whose output only an nn.MaxPool2d reads (in an nn.Sequential, or module calls in a traced
  forward: torchvision ResNet's stem) -> ReLUMaxPool2d (the ReLU becomes torchfast.nn.AbsorbedReLU, an identity);
- inside a block's traced forward (torch.fx): bn -> ReLU -> BatchNormReLU2d, and
  bn -> (+ identity) -> ReLU -> BatchNormAddReLU2d(x, identity): the cheat sheet's ResidualBlock,
  torchvision's BasicBlock and Bottleneck (their downsample branch is the "identity");
- where batch norms fold (a convolutional network), every other plain nn.Conv2d -> torchfast.nn.Conv2d
  (the weight pre-packed for oneDNN in CPU inference);
- optimizer=: torch.optim SGD/Adam/AdamW -> torchfast's, with the same param_groups and state.
A BatchNorm2d that is not a plain nn.BatchNorm2d, that is called more than once, or that has hooks, and
blocks that do not trace, stay as they were; so do the pairs torchfast has no fused form of (a batch
norm before ReLU6/SiLU/..., a convolution before GroupNorm/LayerNorm/...), which the report names. Modules whose forward calls F.scaled_dot_product_attention
(timm's and transformers' attention) get it routed to torchfast's flash kernels by hooks (no forward
rewritten; not while compiling or exporting, where torch's own SDPA is traced); torchfast.enable() does
the same for any code run inside it.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import operator
import threading
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from torchfast import layout_plan
from torchfast.nn import attention as fused_attention
from torchfast.nn import layers as fused
from torchfast.nn.absorbed import absorb_relu
from torchfast.nn.conv import Conv2d as PackedConv2d
from torchfast.nn.pooling import ReLUMaxPool2d, pool_window
from torchfast.nn.sequential import FusedSequential, fold_pairs
from torchfast.ops._registry import exporting

__all__ = ["ConversionReport", "convert", "enable"]


@dataclass
class ConversionReport:
    swaps: list = field(default_factory=list)  # (module path, what was done)
    skipped: list = field(default_factory=list)  # (module path, why it was left alone)

    def __str__(self) -> str:
        lines = [f"torchfast.convert: {len(self.swaps)} swaps, {len(self.skipped)} candidates left alone"]
        lines += [f"  {path or '(model)'}: {what}" for path, what in self.swaps]
        lines += [f"  {path or '(model)'}: left alone: {why}" for path, why in self.skipped]
        return "\n".join(lines)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _plain_bn(m) -> bool:
    return type(m) is nn.BatchNorm2d


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# -- nn.MultiheadAttention ---------------------------------------------------------------------------

def _convert_attention(model: nn.Module, report: ConversionReport) -> None:
    for path, m in model.named_modules():
        if type(m) is nn.MultiheadAttention:
            if _has_hooks(m):
                report.skipped.append((path, "nn.MultiheadAttention with hooks"))
                continue
            m.__class__ = fused_attention.MultiheadAttention
            report.swaps.append((path, "nn.MultiheadAttention -> torchfast.nn.MultiheadAttention"))


# -- BatchNorm2d -> ReLU in nn.Sequential ------------------------------------------------------------

def _chains(m: nn.Module) -> bool:
    """An nn.Sequential whose forward is nn.Sequential's: each child reads the previous one's output
    alone (a subclass with its own forward may read any child's output anywhere)."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


# Activations and norms next to a convolution or a batch norm that torchfast has no fused form of: the
# report names each such pair as a candidate left alone.
_UNFUSED_ACTIVATIONS = (nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Hardswish, nn.Hardtanh, nn.ELU, nn.Mish,
                        nn.Sigmoid, nn.Tanh, nn.PReLU, nn.SELU, nn.CELU)
_UNFUSED_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, nn.LocalResponseNorm)


def _unfused_pair(first: nn.Module, then: nn.Module) -> Optional[str]:
    """Why torchfast leaves `first` -> `then` alone, for the pairs it does not fuse; None for others."""
    if isinstance(first, nn.BatchNorm2d) and isinstance(then, _UNFUSED_ACTIVATIONS):
        return f"BatchNorm2d -> {type(then).__name__}: torchfast fuses a batch norm with ReLU only"
    if isinstance(first, nn.Conv2d) and isinstance(then, _UNFUSED_NORMS):
        return f"Conv2d -> {type(then).__name__}: torchfast folds and fuses BatchNorm2d only"
    return None


def _bn_relu_blocker(bn: nn.Module, relu: nn.Module, counts: Optional[dict] = None) -> Optional[str]:
    if not _plain_bn(bn):
        return f"{type(bn).__name__} is not a plain nn.BatchNorm2d"
    if _has_hooks(bn) or _has_hooks(relu):
        return "hooks on the batch norm or the ReLU"
    if counts is not None and (counts.get(id(bn)) != 1 or counts.get(id(relu)) != 1):
        return "the batch norm or the ReLU is shared with another part of the model"
    return None


def _swap_bn_relu(owner: nn.Module, bn: nn.Module, relu_name: str) -> None:
    parent_path, _, name = relu_name.rpartition(".")
    bn.__class__ = fused.BatchNormReLU2d
    absorb_relu(bn, owner.get_submodule(parent_path) if parent_path else owner, name)


def _convert_sequential(model: nn.Module, report: ConversionReport) -> None:
    counts = _use_counts(model)
    for path, seq in list(model.named_modules()):
        if not _chains(seq) or type(seq) in (fused.ConvBNReLU2d,):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            _consider_bn_relu(seq, path, a, b, report)
        _fold_sequential(path, seq, counts, report)


def _consider_bn_relu(owner: nn.Module, path: str, first_name: str, then_name: str, report: ConversionReport,
                      counts: Optional[dict] = None, once: bool = True) -> None:
    """owner's `first_name` module feeding `then_name` alone: swapped when it is BatchNorm2d -> ReLU and
    nothing blocks it; reported when it is a pair torchfast has no fused form of, or is blocked."""
    first, then = owner.get_submodule(first_name), owner.get_submodule(then_name)
    where = _join(path, first_name)
    unfused = _unfused_pair(first, then)
    if unfused is not None:
        report.skipped.append((where, unfused))
    if not (isinstance(first, nn.BatchNorm2d) and type(then) is nn.ReLU):
        return
    why = _bn_relu_blocker(first, then, counts) or (None if once else "called more than once")
    _swap_or_skip(report, where, why, "BatchNorm2d -> ReLU", lambda: _swap_bn_relu(owner, first, then_name),
                  f"BatchNorm2d + ReLU ({_join(path, then_name)}) -> BatchNormReLU2d")


_ABSORBED = "(the ReLU becomes torchfast.nn.AbsorbedReLU, an identity)"


def _swap_or_skip(report: ConversionReport, where: str, why: Optional[str], pair: str, swap, done: str) -> None:
    """A candidate pair at `where`: left alone and reported with `why`, or swapped and reported as done."""
    if why is not None:
        report.skipped.append((where, f"{pair}: {why}"))
        return
    swap()
    report.swaps.append((where, f"{done} {_ABSORBED}"))


def _fold_sequential(path: str, seq: nn.Sequential, counts: dict, report: ConversionReport) -> None:
    """A Sequential with Conv2d -> batch norm pairs -> FusedSequential (same children and state_dict),
    which folds each pair in inference; left alone if a pair has hooks or is shared."""
    pairs = fold_pairs(seq)
    if not pairs:
        return
    for conv_name, bn_name in pairs:
        conv, bn = seq._modules[conv_name], seq._modules[bn_name]
        if _has_hooks(conv) or _has_hooks(bn) or counts.get(id(conv)) != 1 or counts.get(id(bn)) != 1:
            report.skipped.append((_join(path, conv_name), "Conv2d -> BatchNorm2d: hooks on either, or shared"))
            return
    seq.__class__ = FusedSequential
    report.swaps += [(_join(path, c), f"{_join(path, c)} + {_join(path, b)}: {_FOLDED}") for c, b in pairs]


# -- BatchNorm2d -> ReLU module calls in a forward no block rewrite took (a model's own forward) ------

def _call_counts(graph: torch.fx.Graph) -> dict:
    """How many times the traced forward calls each submodule (by target)."""
    calls: dict = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    return calls


def _traced_module_pairs(owner: nn.Module) -> list:
    """(first node, then node, both called once) for each module call in owner's own forward (traced,
    every submodule a leaf) whose output only one other module call reads, as its single argument."""
    graph = layout_plan.graph_of(owner)
    if graph is None:
        return []
    calls = _call_counts(graph)
    pairs = []
    for first in graph.nodes:
        if first.op != "call_module" or len(first.users) != 1:
            continue
        then = next(iter(first.users))
        if then.op == "call_module" and then.args == (first,) and not then.kwargs:
            pairs.append((first, then, calls[first.target] == 1 and calls[then.target] == 1))
    return pairs


def _convert_traced_bn_relu(model: nn.Module, report: ConversionReport) -> None:
    """Each BatchNorm2d module call whose output only an nn.ReLU module call reads, in the forward of a
    module that is neither torch's own, a chaining nn.Sequential nor a block convert rewrote (the model's
    own forward, say): the same swap as in an nn.Sequential (the layers stay where they are, so the
    module tree and the state_dict do not change)."""
    counts = _use_counts(model)
    for path, owner in list(model.named_modules()):
        if _chains(owner) or type(owner).__module__.startswith("torch.") or \
                isinstance(owner, torch.fx.GraphModule) or not any(_plain_bn(m) for m in owner.modules()):
            continue
        for first, then, once in _traced_module_pairs(owner):
            _consider_bn_relu(owner, path, first.target, then.target, report, counts, once)


# -- nn.ReLU -> nn.MaxPool2d: a network's stem (torchvision's ResNet), VGG-style features -------------

def _use_counts(model: nn.Module) -> dict:
    """How many places of the module tree hold each module (a shared one must not change)."""
    counts: dict = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    return counts


def _relu_pool_blocker(relu: nn.Module, pool: nn.Module, counts: dict) -> Optional[str]:
    if pool_window(pool) is None:
        return "a max pool relu_max_pool2d does not compute (dilation, ceil_mode, return_indices or a window over 256)"
    if _has_hooks(relu) or _has_hooks(pool):
        return "hooks on the ReLU or the pool"
    if counts.get(id(relu)) != 1 or counts.get(id(pool)) != 1:
        return "the ReLU or the pool is shared with another part of the model"
    return None


def _swap_relu_pool(owner: nn.Module, relu_name: str, pool: nn.Module) -> None:
    parent_path, _, name = relu_name.rpartition(".")
    pool.__class__ = ReLUMaxPool2d
    absorb_relu(pool, owner.get_submodule(parent_path) if parent_path else owner, name)


def _traced_relu_pools(owner: nn.Module) -> list:
    """(relu target, pool target, why not or None) for each ReLU module call in owner's own forward
    whose output only a MaxPool2d module call reads, each module called once there."""
    found = []
    for relu, pool, once in _traced_module_pairs(owner):
        if type(owner.get_submodule(relu.target)) is not nn.ReLU or len(relu.args) != 1 or relu.kwargs or \
                type(owner.get_submodule(pool.target)) is not nn.MaxPool2d:
            continue
        why = None
        if not once:
            why = "the ReLU or the pool is called more than once"
        elif owner.get_submodule(relu.target).inplace and not (
                isinstance(relu.args[0], torch.fx.Node) and len(relu.args[0].users) == 1):
            why = "an in-place ReLU whose input is read elsewhere too"
        found.append((relu.target, pool.target, why))
    return found


def _convert_relu_pool(model: nn.Module, report: ConversionReport) -> None:
    """Each nn.ReLU whose output only an nn.MaxPool2d reads (adjacent children of an nn.Sequential, or
    module calls in a forward, traced with torch.fx) -> the ReLU becomes AbsorbedReLU (an identity) and the pool
    torchfast.nn.ReLUMaxPool2d: the two in one pass (no state changes: neither has any)."""
    counts = _use_counts(model)
    for path, owner in list(model.named_modules()):
        if _chains(owner):
            names = list(owner._modules)
            pairs = [(a, b, None) for a, b in zip(names, names[1:])
                     if type(owner._modules[a]) is nn.ReLU and type(owner._modules[b]) is nn.MaxPool2d]
        elif type(owner).__module__.startswith("torch.") and not isinstance(owner, torch.fx.GraphModule):
            continue  # torch's own layers
        elif any(type(m) is nn.MaxPool2d for m in owner.modules()):
            pairs = _traced_relu_pools(owner)
        else:
            continue
        for relu_name, pool_name, why in pairs:
            relu, pool = owner.get_submodule(relu_name), owner.get_submodule(pool_name)
            why = why or _relu_pool_blocker(relu, pool, counts)
            if type(relu) is not nn.ReLU or type(pool) is not nn.MaxPool2d:
                continue  # (swapped already, through another owner)
            _swap_or_skip(report, _join(path, relu_name), why, "ReLU -> MaxPool2d",
                          lambda: _swap_relu_pool(owner, relu_name, pool),
                          f"ReLU + MaxPool2d ({_join(path, pool_name)}) -> ReLUMaxPool2d")


# -- blocks, by their traced forward ------------------------------------------------------------------

_ADDS = {operator.add, operator.iadd, torch.add}
_RELU_FUNCTIONS = {torch.relu, F.relu, torch.relu_}


def _is_relu(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def _bn_node(node, gm, calls: dict):
    """`node` if it calls a plain BatchNorm2d module once in the graph, with no hooks, else None."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    if not _plain_bn(m) or calls.get(node.target, 0) != 1 or _has_hooks(m) or len(node.users) != 1:
        return None
    return node


def _rewrite_block(module: nn.Module) -> Optional[tuple]:
    """(GraphModule, [descriptions]) with the block's BN -> (+ identity) -> ReLU runs fused, or None."""
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception:  # data-dependent control flow and the like: left as it is
        return None
    calls = _call_counts(gm.graph)
    done = []
    for relu in list(gm.graph.nodes):
        if not _is_relu(relu, gm) or len(relu.args) != 1:
            continue
        src = relu.args[0]
        bn = _bn_node(src, gm, calls)
        if bn is not None:  # bn -> relu
            gm.get_submodule(bn.target).__class__ = fused.BatchNormReLU2d
            relu.replace_all_uses_with(bn)
            gm.graph.erase_node(relu)
            done.append(f"{bn.target} + ReLU -> BatchNormReLU2d")
            continue
        if not (isinstance(src, torch.fx.Node) and _is_add(src) and len(src.users) == 1):
            continue
        for i in (0, 1):
            bn = _bn_node(src.args[i], gm, calls)
            if bn is None:
                continue
            identity = src.args[1 - i]
            bn_mod = gm.get_submodule(bn.target)
            bn_mod.__class__ = fused.BatchNormAddReLU2d
            with gm.graph.inserting_before(relu):
                fused_node = gm.graph.call_module(bn.target, (bn.args[0], identity))
            relu.replace_all_uses_with(fused_node)
            gm.graph.erase_node(relu)
            gm.graph.erase_node(src)
            gm.graph.erase_node(bn)
            done.append(f"{bn.target} + residual add + ReLU -> BatchNormAddReLU2d")
            break
    if not done:
        return None
    done += _fold_convolutions(gm, calls)
    gm.graph.lint()
    gm.recompile()
    return gm, done


_FOLDED = "the batch norm folded into the convolution in inference"


def _fold_convolutions(gm: torch.fx.GraphModule, calls: dict) -> list:
    """Each conv -> fused BN node pair (the conv's output used by the BN alone, the conv called once)
    becomes one call of layers.conv_bn_relu, which folds the BN into the convolution in inference and
    calls the two modules otherwise. The modules stay where they are (get_attr nodes hand them over),
    so the state_dict, and the conv called on its own, are unchanged."""
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)) not in (fused.BatchNormReLU2d,
                                                                                  fused.BatchNormAddReLU2d):
            # a plain batch norm after a convolution (a downsample branch) folds as well
            if _bn_node(node, gm, calls) is None or len(node.args) != 1 or node.kwargs:
                continue
        conv = node.args[0]
        if not (isinstance(conv, torch.fx.Node) and conv.op == "call_module" and len(conv.users) == 1
                and calls.get(conv.target) == 1 and type(gm.get_submodule(conv.target)) is nn.Conv2d
                and len(conv.args) == 1 and not conv.kwargs):
            continue
        residual = node.args[1] if len(node.args) > 1 else None
        with gm.graph.inserting_before(node):
            conv_attr, bn_attr = gm.graph.get_attr(conv.target), gm.graph.get_attr(node.target)
            fused_node = gm.graph.call_function(fused.conv_bn_relu, (conv.args[0], conv_attr, bn_attr, residual))
        node.replace_all_uses_with(fused_node)
        gm.graph.erase_node(node)
        gm.graph.erase_node(conv)
        done.append(f"{conv.target} + {node.target}: {_FOLDED}")
    return done


def _convert_blocks(model: nn.Module, report: ConversionReport) -> None:
    """Each block (a module with BatchNorm2d children whose class is not torch's own) is traced and
    rewritten; it is replaced only if its state_dict keys stay the same."""
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            where = _join(path, name)
            if type(child).__module__.startswith("torch.") or isinstance(child, nn.Sequential) or \
                    not any(_plain_bn(m) for m in child.children()):
                continue
            if _has_hooks(child):
                report.skipped.append((where, "hooks on the block"))
                continue
            keys = list(child.state_dict())
            rewritten = _rewrite_block(child)
            if rewritten is None:
                report.skipped.append((where, f"{type(child).__name__}: its forward does not trace (torch.fx) or "
                                              "has no BatchNorm2d -> (add) -> ReLU run"))
                continue
            gm, done = rewritten
            if list(gm.state_dict()) != keys:
                for m in gm.modules():  # undo the class swaps on the shared submodules
                    if type(m) in (fused.BatchNormReLU2d, fused.BatchNormAddReLU2d):
                        m.__class__ = nn.BatchNorm2d
                report.skipped.append((where, "the traced block would change the state_dict keys"))
                continue
            gm.__class__.__name__ = f"Fused{type(child).__name__}"
            setattr(parent, name, gm)
            report.swaps += [(where, d) for d in done]


# -- the other convolutions ---------------------------------------------------------------------------

def _folded_convolutions(model: nn.Module) -> set:
    """ids of the convolutions a rewritten block or a FusedSequential hands to conv_bn_relu (folded into
    their batch norm in inference, where conv_bn_relu packs the folded weight itself)."""
    ids = set()
    for gm in model.modules():
        if type(gm) is FusedSequential:
            ids.update(id(gm._modules[conv]) for conv, _ in fold_pairs(gm))
        if isinstance(gm, torch.fx.GraphModule):
            for node in gm.graph.nodes:
                if node.op == "call_function" and node.target is fused.conv_bn_relu:
                    ids.add(id(gm.get_submodule(node.args[1].target)))
    return ids


def _convert_convolutions(model: nn.Module, report: ConversionReport) -> None:
    """Each plain nn.Conv2d not folded into a batch norm (a stem, a conv before a ReLU -> pool) ->
    torchfast.nn.Conv2d: the same layer, whose CPU fp32 inference takes a pre-packed weight."""
    folded = _folded_convolutions(model)
    for path, m in model.named_modules():
        if type(m) is not nn.Conv2d or id(m) in folded:
            continue
        if _has_hooks(m):
            report.skipped.append((path, "nn.Conv2d with hooks"))
            continue
        m.__class__ = PackedConv2d
        report.swaps.append((path, "nn.Conv2d -> torchfast.nn.Conv2d (CPU fp32 inference: the weight pre-packed "
                                   "for oneDNN)"))


# -- optimizers ---------------------------------------------------------------------------------------

def _convert_optimizer(optimizer: torch.optim.Optimizer, old: nn.Module, new: nn.Module, report: ConversionReport):
    import torchfast.optim as fast_optim

    kinds = {torch.optim.SGD: fast_optim.SGD, torch.optim.Adam: fast_optim.Adam, torch.optim.AdamW: fast_optim.AdamW}
    cls = kinds.get(type(optimizer))
    if cls is None:
        report.skipped.append(("optimizer", f"{type(optimizer).__name__} has no torchfast counterpart"))
        return optimizer
    mapping = {id(p): q for p, q in zip(old.parameters(), new.parameters())}
    groups = []
    for group in optimizer.param_groups:
        params = [mapping.get(id(p), p) for p in group["params"]]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    fast = cls(groups)
    # a copy of the state: load_state_dict keeps the tensors it is given, which would tie the two
    # optimizers' moments together
    fast.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    report.swaps.append(("optimizer", f"torch.optim.{type(optimizer).__name__} -> torchfast.optim.{cls.__name__}"))
    return fast


def convert(model: nn.Module, *, inplace: bool = False, optimizer: Optional[torch.optim.Optimizer] = None,
            report: bool = False):
    """`model` with torchfast's fused layers swapped in where they compute the same (a copy unless
    `inplace`). With `optimizer`, returns (model, optimizer): a torch.optim SGD/Adam/AdamW becomes the
    torchfast one over the converted model's parameters, with the same param_groups and state.
    The ConversionReport is on `model.torchfast_conversion`; `report=True` also prints it."""
    out = model if inplace else copy.deepcopy(model)
    rep = ConversionReport()
    _convert_attention(out, rep)
    _convert_blocks(out, rep)
    _convert_relu_pool(out, rep)  # (before BatchNorm2d -> ReLU: a pool after the ReLU pays more)
    _convert_sequential(out, rep)
    _convert_traced_bn_relu(out, rep)
    _route_sdpa_calls(out, rep)
    if any(what.endswith(_FOLDED) for _, what in rep.swaps):  # (the plan pays where convolutions fold)
        _convert_convolutions(out, rep)  # a convolutional network's inference: its other convolutions too
        why_not = layout_plan.install(out)
        if why_not is None:
            rep.swaps.append(("", "CPU inference runs channels_last inside (the input converted once, 4-D outputs "
                                  "converted back): torchfast.layout_plan"))
        else:
            rep.skipped.append(("", f"layout plan (channels_last CPU inference): {why_not}"))
    out.torchfast_conversion = rep
    if report:
        print(rep)
    if optimizer is not None:
        return out, _convert_optimizer(optimizer, model, out, rep)
    return out


# -- F.scaled_dot_product_attention calls in foreign forwards (timm, transformers) ---------------------

_ROUTED: threading.local = threading.local()  # per thread: the routing modes entered by pre-hooks


def _calls_sdpa(cls: type) -> bool:
    """Whether `cls.forward`'s own source calls scaled_dot_product_attention."""
    if cls not in _SDPA_CLASSES:
        try:
            _SDPA_CLASSES[cls] = "scaled_dot_product_attention" in inspect.getsource(cls.forward)
        except (OSError, TypeError):  # built-in or generated code: no source to read
            _SDPA_CLASSES[cls] = False
    return _SDPA_CLASSES[cls]


_SDPA_CLASSES: dict = {}


def _enter_routing(module, args):
    stack = _ROUTED.__dict__.setdefault("stack", [])
    # torch.compile and export trace torch's own SDPA (inductor fuses it); eager calls take torchfast's
    if torch.compiler.is_compiling() or exporting() or _short_cpu_tokens(args):
        stack.append(None)
        return
    mode = _SDPARouting(automatic=True)
    mode.__enter__()
    stack.append(mode)


def _short_cpu_tokens(args) -> bool:
    """A (batch, tokens, channels) CPU input too short for torchfast's kernel to pay: the mode is not
    entered at all (inside it every torch call of the forward pays a Python dispatch)."""
    x = args[0] if args else None
    return (isinstance(x, torch.Tensor) and x.dim() == 3 and x.device.type == "cpu"
            and x.shape[1] * x.shape[1] < CPU_ROUTING_MIN_PAIRS)


def _exit_routing(module, args, output):
    mode = _ROUTED.stack.pop()
    if mode is not None:
        mode.__exit__(None, None, None)


def _route_sdpa_calls(model: nn.Module, report: ConversionReport) -> None:
    """Modules whose forward calls F.scaled_dot_product_attention itself (timm's Attention, transformers'
    SDPA attention) run it as torchfast's: a pre-hook enters the routing mode of torchfast.enable() and a
    forward hook (always called, also when the forward raises) leaves it, so only those forwards pay for
    the mode. Hooks rather than a rewritten forward: they travel with copy.deepcopy and state_dict stays."""
    for path, m in model.named_modules():
        if isinstance(m, (fused_attention.MultiheadAttention, nn.MultiheadAttention)) or not _calls_sdpa(type(m)):
            continue
        if getattr(m, "_torchfast_sdpa_routed", False):
            continue
        m.register_forward_pre_hook(_enter_routing)
        m.register_forward_hook(_exit_routing, always_call=True)
        m._torchfast_sdpa_routed = True
        report.swaps.append((path, "F.scaled_dot_product_attention calls -> torchfast's flash attention (CPU: from "
                                   "512 x 512 query-key pairs, where it is the faster)"))


# On the CPU torchfast's kernel is ahead of torch's SDPA from about 512 x 512 query-key pairs
# (forward + backward 0.88-0.98x at L = 512-1024; 1.03-1.45x below, where torch's short-sequence
# path wins; `torchfast bench --suites attention` and the crossover in benchmarks/RESULTS.md).
CPU_ROUTING_MIN_PAIRS = 512 * 512


def _pays(args, kwargs) -> bool:
    q = args[0] if args else kwargs.get("query")
    k = args[1] if len(args) > 1 else kwargs.get("key")
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() < 2 or k.dim() < 2:
        return True  # let torchfast's function say what is wrong with the arguments
    return q.device.type != "cpu" or q.shape[-2] * k.shape[-2] >= CPU_ROUTING_MIN_PAIRS


class _SDPARouting(torch.overrides.TorchFunctionMode):
    """F.scaled_dot_product_attention -> torchfast's. automatic=True (what torchfast.convert installs):
    only where torchfast's kernel is the faster one (see CPU_ROUTING_MIN_PAIRS); torchfast.enable()
    routes every call."""

    def __init__(self, automatic: bool = False):
        super().__init__()
        self.automatic = automatic

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and (not self.automatic or _pays(args, kwargs)):
            from torchfast.nn.functional import scaled_dot_product_attention

            with torch._C.DisableTorchFunction():
                return scaled_dot_product_attention(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def enable():
    """Inside it, torch.nn.functional.scaled_dot_product_attention runs torchfast's flash kernels
    (for models whose attention calls F.scaled_dot_product_attention directly: timm, transformers)."""
    with _SDPARouting():
        yield
