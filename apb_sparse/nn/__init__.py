"""Layers: masked (training) and sparse (deployment)."""
from .masked import MaskedConv2d, MaskedLayer, MaskedLinear, masked_layers, to_masked
from .sparse import ChannelSparseConv2d, SparseConv2d, SparseLinear

__all__ = ["MaskedConv2d", "MaskedLinear", "MaskedLayer", "masked_layers", "to_masked",
           "SparseConv2d", "SparseLinear", "ChannelSparseConv2d"]
