"""fully_shard for models with torchfast's layers, and the set of modules the Trainer shards as units."""
from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import fully_shard as _torch_fully_shard


def fully_shard(module: nn.Module, **kwargs):
    """torch.distributed.fsdp.fully_shard(module, **kwargs), after making every parameter of `module`
    contiguous (same values; FSDP2 refuses other layouts).

    torchfast.models.ComplexNetwork keeps its convolution weights channels_last on the CPU (so oneDNN
    does not reorder them every pass). Under FSDP2 the unsharded weight is all-gathered into a
    contiguous buffer anyway, and the fused convolutions make their channels_last copy once per
    change of the weight; the model is told to keep its weights contiguous from then on."""
    for m in module.modules():
        if hasattr(m, "_contiguous_weights"):
            m._contiguous_weights = True
        for name, p in m.named_parameters(recurse=False):
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    return _torch_fully_shard(module, **kwargs)


def default_units(model: nn.Module) -> list[nn.Module]:
    """The submodules the Trainer shards as their own FSDP units (all-gathered just before their forward,
    freed after): residual blocks, attention and transformer layers, torchvision's ResNet blocks; inner
    ones first, the order fully_shard needs. Everything else belongs to the root unit (a module that a
    forward does not call as a module, such as ComplexNetwork's fused `features`, must stay there)."""
    from torchfast.nn.layers import ResidualBlock
    from torchfast.reference.modules import ResidualBlock as PlainResidualBlock

    unit_types = (ResidualBlock, PlainResidualBlock, nn.MultiheadAttention, nn.TransformerEncoderLayer,
                  nn.TransformerDecoderLayer)
    from torchfast.models import ComplexNetwork

    # inside ComplexNetwork's features the fused conv -> ReLU -> pool path runs only while no submodule
    # carries hooks (FSDP's, on a unit): the block stays in the root unit there
    fused_features = {id(m) for net in model.modules() if isinstance(net, ComplexNetwork)
                      for m in net.features.modules()}
    units = [m for m in model.modules() if m is not model and id(m) not in fused_features and
             (isinstance(m, unit_types) or type(m).__name__ in ("BasicBlock", "Bottleneck"))]
    return units[::-1]
