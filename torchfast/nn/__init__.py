"""Drop-in layers (torchfast.nn), their functional forms and utilities (gradient clipping)."""
from torchfast.nn import functional, utils  # noqa: F401
from torchfast.nn.absorbed import AbsorbedReLU
from torchfast.nn.attention import MultiheadAttention
from torchfast.nn.conv import Conv2d
from torchfast.nn.layers import (BatchNormAddReLU2d, BatchNormReLU2d, ConvBNReLU2d, ResidualBlock,
                                 SyncBatchNormAddReLU2d, SyncBatchNormReLU2d, convert_sync_batchnorm)
from torchfast.nn.pooling import ReLUMaxPool2d
from torchfast.nn.sequential import FusedSequential

__all__ = ["AbsorbedReLU", "BatchNormAddReLU2d", "BatchNormReLU2d", "Conv2d", "ConvBNReLU2d", "FusedSequential",
           "MultiheadAttention",
           "ReLUMaxPool2d", "ResidualBlock", "SyncBatchNormAddReLU2d", "SyncBatchNormReLU2d",
           "convert_sync_batchnorm", "functional", "utils"]
