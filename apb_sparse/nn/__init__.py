"""Layers: masked (training), sparse and pooling (deployment)."""
from .masked import MaskedConv2d, MaskedLayer, MaskedLinear, masked_layers, to_masked
from .pool import MaxPool2x2
from .sparse import ChannelSparseConv2d, SparseConv2d, SparseLinear

__all__ = ["MaskedConv2d", "MaskedLinear", "MaskedLayer", "masked_layers", "to_masked",
           "SparseConv2d", "SparseLinear", "ChannelSparseConv2d", "MaxPool2x2"]
