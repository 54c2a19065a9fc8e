"""Drop-in fused layers: same constructors, state_dict keys and results as the torch stacks (and
the cheat sheet's ResidualBlock) they replace, with batch norm, the residual add and the ReLU in
one fused kernel. The convolutions stay with oneDNN/cuDNN."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

from torchfast.nn import _onednn, _train_conv
from torchfast.nn.functional import batch_norm_add_relu
from torchfast.sharded.dtensor import version_counters_track_contents
from torchfast.ops._registry import exporting
from torchfast.reference.pool import is_channels_last

__all__ = ["BatchNormReLU2d", "BatchNormAddReLU2d", "ConvBNReLU2d", "FoldedConvBN", "ResidualBlock",
           "SyncBatchNormAddReLU2d", "SyncBatchNormReLU2d", "add_relu", "can_fold", "conv_bn_relu", "convert_sync_batchnorm",
           "fold_conv_bn", "fused_batch_norm", "plain_path_needed"]


def fused_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor, residual: Optional[Tensor] = None,
                     relu: bool = True) -> Tensor:
    """What `relu(bn(x) + residual)` computes, with nn.BatchNorm's own bookkeeping
    (num_batches_tracked, momentum=None as a cumulative average, track_running_stats)."""
    bn._check_input_dim(x)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return batch_norm_add_relu(x, bn.running_mean if track else None, bn.running_var if track else None,
                               bn.weight, bn.bias, residual, use_batch_stats, factor, bn.eps, relu)


def _traced_call(module: nn.Module, *args):
    """Under torch.fx tracing: one call of `module` recorded (a leaf, as torch's own layers are),
    instead of tracing into the fused layer's bookkeeping."""
    tracer = args[0].tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


class BatchNormReLU2d(nn.BatchNorm2d):
    """nn.BatchNorm2d followed by ReLU (same arguments and state_dict as nn.BatchNorm2d)."""

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            return _traced_call(self, input)
        return fused_batch_norm(self, input, None, relu=True)


class BatchNormAddReLU2d(nn.BatchNorm2d):
    """relu(nn.BatchNorm2d(x) + residual): forward(x, residual) (state_dict of nn.BatchNorm2d)."""

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            return _traced_call(self, input, residual)
        return fused_batch_norm(self, input, residual, relu=True)


class SyncBatchNormReLU2d(nn.SyncBatchNorm):
    """What BatchNormReLU2d becomes under torchfast.nn.convert_sync_batchnorm: statistics synchronised
    across processes (nn.SyncBatchNorm), then the ReLU."""

    def forward(self, input: Tensor) -> Tensor:
        return torch.relu(super().forward(input))


class SyncBatchNormAddReLU2d(nn.SyncBatchNorm):
    """What BatchNormAddReLU2d becomes under torchfast.nn.convert_sync_batchnorm: forward(x, residual)."""

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        return torch.relu(super().forward(input) + residual)


_SYNC_VERSIONS = {BatchNormReLU2d: SyncBatchNormReLU2d, BatchNormAddReLU2d: SyncBatchNormAddReLU2d}


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """nn.SyncBatchNorm.convert_sync_batchnorm that knows torchfast's fused layers: torch's would turn
    BatchNormReLU2d/BatchNormAddReLU2d into a plain SyncBatchNorm (dropping the ReLU and the residual);
    here they keep them. Every other batch norm is converted as torch converts it; ResidualBlock and
    ConvBNReLU2d run their converted batch norms as submodules (synchronised statistics, unfused)."""
    sync_cls = _SYNC_VERSIONS.get(type(module))
    if sync_cls is None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
        out = module
    else:
        out = sync_cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                       process_group)
        if module.affine:
            with torch.no_grad():
                out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


class ConvBNReLU2d(nn.Sequential):
    """nn.Sequential(nn.Conv2d(...), nn.BatchNorm2d(out_channels), nn.ReLU()) with the batch norm and
    the ReLU fused: the same children ("0", "1", "2"), so a state_dict of that plain stack loads.
    Takes nn.Conv2d's arguments, then the batch-norm options; relu=False drops the ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, relu=True):
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                            padding_mode, device=device, dtype=dtype),
                  nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device=device,
                                 dtype=dtype)]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)
        self.relu = relu
        self._folded = FoldedConvBN()

    def forward(self, input: Tensor) -> Tensor:
        conv, bn = self[0], self[1]
        if not isinstance(conv, nn.Conv2d) or plain_path_needed(self, (bn,), input):
            return super().forward(input)
        if input.dim() != 4:  # what bn would say about the convolution's output
            raise ValueError(f"torchfast.nn.ConvBNReLU2d: expected 4D input (got {input.dim()}D input)")
        if conv.padding_mode == "zeros" and can_fold(self, (bn,), input):
            weight, bias = self._folded.get(conv, bn, is_channels_last(input))
            if _onednn.usable(input, weight, conv.padding):  # the ReLU as the convolution's post-op
                return _onednn.conv2d_relu(input, weight, bias, conv.stride, conv.padding, conv.dilation,
                                           conv.groups, self.relu, self._folded.packed)
            out = torch.nn.functional.conv2d(input, weight, bias, conv.stride, conv.padding, conv.dilation,
                                             conv.groups)
            return out.relu_() if self.relu else out
        out = _train_conv.conv2d(conv, input, conv) if type(conv) is nn.Conv2d else conv(input)
        return fused_batch_norm(bn, out, None, relu=self.relu)

    def train(self, mode: bool = True):
        self._folded = FoldedConvBN()  # a mode switch drops the folded weights
        return super().train(mode)


def _pruned(module: nn.Module, name: str = "weight") -> bool:
    """Whether torch.nn.utils.prune reparametrises module.<name> (as <name>_orig * <name>_mask)."""
    return name not in module._parameters and name + "_orig" in module._parameters and \
        name + "_mask" in module._buffers


def current_weight(conv: nn.Module) -> Tensor:
    """conv.weight as its forward would see it now: for a weight pruned by torch.nn.utils.prune,
    weight_orig * weight_mask (the attribute `weight` is only refreshed when the module is called)."""
    if _pruned(conv):
        return conv._parameters["weight_orig"] * conv._buffers["weight_mask"]
    return conv.weight


def _weight_sources(conv: nn.Module) -> tuple:
    if _pruned(conv):
        return conv._parameters["weight_orig"], conv._buffers["weight_mask"]
    return (conv._parameters["weight"],)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Weight and bias of one convolution computing bn(conv(x)) with bn's running statistics."""
    with torch.no_grad():
        stat = torch.float64 if conv.weight.dtype == torch.float64 else torch.float32
        invstd = torch.rsqrt(bn.running_var.to(stat) + bn.eps)
        scale = invstd if bn.weight is None else invstd * bn.weight.to(stat)
        shift = -bn.running_mean.to(stat) * scale
        if conv.bias is not None:
            shift = shift + conv.bias.to(stat) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(stat)
        conv_weight = current_weight(conv)
        weight = conv_weight.to(stat) * scale.view(-1, *([1] * (conv_weight.dim() - 1)))
        return weight.to(conv_weight.dtype), shift.to(conv_weight.dtype)


def _versions(tensors) -> tuple:
    """What identifies the tensors' contents to torch: the tensor objects, their version counters
    and storage (a .to() or a replaced .data gets new storage). Raises RuntimeError for inference
    tensors (no version counter)."""
    return tuple((id(t), t._version, t.data_ptr()) if t is not None else None for t in tensors)


def _fold_for_layout(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm, channels_last: bool):
    with torch.inference_mode(False):  # plain tensors even under inference_mode: their versions can be read
        weight, bias = fold_conv_bn(conv, bn)
        # in the input's layout whatever the conv weight's own (the output follows the input's layout)
        return weight.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format), \
            bias


class FoldedConvBN:
    """The folded weight and bias of one (conv, bn) pair, per memory layout, rebuilt whenever one of
    the tensors they come from changes as torch tracks changes (their version counters: in-place
    updates, optimizer steps, load_state_dict, .to(), ...). Writes through `.data` bypass version
    counters (as they bypass autograd's checks): after those, switch the mode (`.eval()`) to drop
    the cache. Folded afresh on every call, uncached, while torch.compile/export traces (fake
    tensors have no data pointers), for inference tensors (they have no version counter) and under
    FSDP2 (which keeps version counters while it rewrites the parameters)."""

    def __init__(self):
        self.key = None
        self.by_layout: dict = {}
        self.packed = _onednn.PackedWeight()  # the folded weight as oneDNN wants it (see conv2d_relu)

    def get(self, conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm, channels_last: bool) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling() or exporting() or parametrize.is_parametrized(conv) or \
                parametrize.is_parametrized(bn) or not version_counters_track_contents():
            # traced, a parametrized weight (weight_norm, spectral_norm: recomputed on each access), or
            # FSDP2's unsharded parameters (rewritten in place with their version counters kept)
            return _fold_for_layout(conv, bn, channels_last)
        # straight from the modules' dicts: nn.Module.__getattr__ would cost ~1 us per tensor, which
        # shows at batch-1 inference
        p, q, b = conv._parameters, bn._parameters, bn._buffers
        sources = (*_weight_sources(conv), p.get("bias"), q.get("weight"), q.get("bias"), b.get("running_mean"),
                   b.get("running_var"))
        try:
            key = _versions(sources) + (bn.eps,)
        except RuntimeError:  # inference tensors: nothing tells whether they changed
            return _fold_for_layout(conv, bn, channels_last)
        if key != self.key:
            self.key, self.by_layout = key, {}
        if channels_last not in self.by_layout:
            self.by_layout[channels_last] = _fold_for_layout(conv, bn, channels_last)
        return self.by_layout[channels_last]


def plain_path_needed(module: nn.Module, bns, x: Tensor) -> bool:
    """Whether a fused layer should run its submodules as the plain torch stack does: when forward or
    backward hooks sit on them (they fire only if the submodules are called; torch.nn.utils.prune's
    weight reparametrisation is the exception: the fused paths read weight_orig * weight_mask), when a batch norm is not a plain
    nn.BatchNorm2d (e.g. SyncBatchNorm after convert_sync_batchnorm), or under autocast (which
    applies to the submodules' ops, so the fused kernels would change the result's dtype)."""
    if any(type(bn) not in (nn.BatchNorm2d, BatchNormReLU2d, BatchNormAddReLU2d) for bn in bns):
        return True
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        return True
    hooks = nn.modules.module
    if (hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
            or hooks._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._backward_hooks or m._backward_pre_hooks or
               any(not isinstance(h, prune.BasePruningMethod) for h in m._forward_pre_hooks.values())
               for m in module.children())


def can_fold(module: nn.Module, bns, x: Tensor) -> bool:
    """Eval mode with running statistics and no gradient wanted: the folded path computes the same."""
    if module.training or any(bn.running_mean is None or bn.running_var is None for bn in bns):
        return False  # without running statistics, eval mode still normalises with batch statistics
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())):
        return False  # folded weights are constants: gradients need the unfolded path
    return True


def conv_bn_relu(x: Tensor, conv: nn.Conv2d, bn: nn.Module, residual: Optional[Tensor] = None) -> Tensor:
    """bn(conv(x)) -> ReLU, or relu(bn(conv(x)) + residual), for a BatchNormReLU2d / BatchNormAddReLU2d
    `bn` (what torchfast.convert puts after a block's convolution); bn(conv(x)) for a plain BatchNorm2d
    (or the SyncBatchNorm it becomes). In inference (both modules in eval mode, running statistics, no
    gradient wanted) the batch norm is folded into the convolution and the ReLU (and the add) run as its
    oneDNN post-ops on the CPU: one pass instead of two or three. Anything else, hooks on either module
    or autocast included, calls the two modules."""
    if isinstance(x, torch.fx.Proxy):
        # torch.fx retracing a converted block (torch.load of a pickled model re-traces its code): the
        # call stays one call, as it was written, instead of being traced into for one mode
        return x.tracer.create_proxy("call_function", conv_bn_relu, (x, conv, bn, residual), {})
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in (conv, bn))
    if (hooked or type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or conv.training or bn.training
            or bn.running_mean is None or bn.running_var is None or x.dim() != 4
            or (x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type))
            or (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in conv.parameters())
                                            or any(p.requires_grad for p in bn.parameters())))):
        # small output maps in training: maybe through im2col (measured, see _train_conv)
        out = _train_conv.conv2d(conv, x, conv) if not hooked and type(conv) is nn.Conv2d else conv(x)
        return bn(out) if residual is None else bn(out, residual)
    folded = bn.__dict__.get("_torchfast_folded")
    if folded is None:
        folded = bn.__dict__["_torchfast_folded"] = FoldedConvBN()  # not state: rebuilt when the tensors change
    weight, bias = folded.get(conv, bn, is_channels_last(x))
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    relu = residual is not None or type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm)
    if _onednn.usable(x, weight, conv.padding):
        if residual is None:
            return _onednn.conv2d_relu(x, weight, bias, *args, relu, folded.packed, choose=True)
        if residual.shape == (x.size(0), weight.size(0)) + residual.shape[2:] and residual.dtype == x.dtype:
            out_layout_ok = residual.is_contiguous(memory_format=torch.channels_last) if is_channels_last(x) \
                else residual.is_contiguous()
            if out_layout_ok:
                return _onednn.conv2d_add_relu(x, residual, weight, bias, *args, folded.packed, choose=True)
    out = torch.nn.functional.conv2d(x, weight, bias, *args)
    if residual is None:
        return out.relu_() if relu else out
    return add_relu(out, residual)


def _train_channels_last(x: Tensor) -> bool:
    """A contiguous (NCHW) CPU fp32 input whose convolutions should run channels_last in training."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.is_contiguous()
            and not x.is_contiguous(memory_format=torch.channels_last) and not exporting())


def add_relu(x: Tensor, residual: Tensor) -> Tensor:
    """relu(x + residual) in one pass: the fused kernel with identity statistics (exact: scale 1, shift 0)."""
    c = x.size(1)
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    zeros = torch.zeros(c, dtype=stat, device=x.device)
    ones = torch.ones(c, dtype=stat, device=x.device)
    return batch_norm_add_relu(x, zeros, ones, None, None, residual, training=False, eps=0.0, relu=True)


class ResidualBlock(nn.Module):
    """The cheat sheet's ResidualBlock (conv-BN-ReLU-conv-BN, + input, ReLU), same constructor and
    submodules (conv1, bn1, relu, conv2, bn2; convs with bias), so its state_dict loads unchanged.

    Training: each BN + (residual add) + ReLU is one fused kernel; on the CPU a contiguous fp32
    input runs channels_last inside the block (its convolutions are faster so) and the output is
    converted back. Inference (eval mode, no gradient needed): the BNs are folded into the
    convolutions (cached until a parameter or buffer changes or the mode switches), the convolutions
    keep the input's layout (channels_last inputs are the fast case on CPU), and the ReLU and the
    residual add + ReLU follow each convolution: as oneDNN post-ops on CPU fp32 inputs from 16K
    elements, as torch's in-place ops on other CPU inputs, as one fused kernel on CUDA.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self._folded = (FoldedConvBN(), FoldedConvBN())  # inference weights of (conv1, bn1), (conv2, bn2)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.size(1) != self.channels:
            raise ValueError(f"torchfast.nn.ResidualBlock({self.channels}): expected input of shape "
                             f"(N, {self.channels}, H, W), got {tuple(x.shape)}")
        if plain_path_needed(self, (self.bn1, self.bn2), x):
            return self._plain(x)
        if can_fold(self, (self.bn1, self.bn2), x):
            return self._inference(x)
        if _train_channels_last(x):
            # channels_last convolutions (and their backward) are the fast ones on CPU: converting
            # the input in and the output back costs less than they save (measured:
            # benchmarks/RESULTS.md). The output keeps the input's layout.
            return self._train(x.contiguous(memory_format=torch.channels_last)).contiguous()
        return self._train(x)

    def _plain(self, x: Tensor) -> Tensor:
        # the cheat sheet's forward, submodule by submodule (see plain_path_needed)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)

    def _train(self, x: Tensor) -> Tensor:
        out = fused_batch_norm(self.bn1, self.conv1(x), None, relu=True)
        return fused_batch_norm(self.bn2, self.conv2(out), x, relu=True)

    def _inference(self, x: Tensor) -> Tensor:
        # The convolutions follow the input's layout: converting a contiguous input costs about what
        # channels_last convolutions save (measured: benchmarks/RESULTS.md).
        cl = is_channels_last(x)
        w1, b1 = self._folded[0].get(self.conv1, self.bn1, cl)
        w2, b2 = self._folded[1].get(self.conv2, self.bn2, cl)
        if _onednn.usable(x, w1, (1, 1)):  # ReLU, and add + ReLU, as the convolutions' post-ops
            out = _onednn.conv2d_relu(x, w1, b1, (1, 1), (1, 1), (1, 1), 1, True, self._folded[0].packed)
            return _onednn.conv2d_add_relu(out, x, w2, b2, (1, 1), (1, 1), (1, 1), 1, self._folded[1].packed)
        out = torch.nn.functional.conv2d(x, w1, b1, padding=1).relu_()
        out = torch.nn.functional.conv2d(out, w2, b2, padding=1)
        # CPU inputs the post-op convolution does not take (small, not fp32, traced): torch's in-place
        # add and ReLU (on the fresh conv output); elsewhere the one-pass fused kernel
        return out.add_(x).relu_() if x.device.type == "cpu" else add_relu(out, x)

    def train(self, mode: bool = True):
        self._folded = (FoldedConvBN(), FoldedConvBN())  # a mode switch drops the folded weights
        return super().train(mode)
