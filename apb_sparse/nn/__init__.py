"""Layers: masked (training) and sparse (deployment)."""
from .masked import MaskedConv2d, MaskedLinear, MaskedLayer, masked_layers, to_masked

__all__ = ["MaskedConv2d", "MaskedLinear", "MaskedLayer", "masked_layers", "to_masked"]
