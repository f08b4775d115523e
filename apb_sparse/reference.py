"""Pure-PyTorch references of every apb_sparse op (tests compare the kernels against these)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import IntPair, unpack_csr


def masked_conv2d(input: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None,
                  stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1) -> Tensor:
    """``F.conv2d`` with ``weight * mask``."""
    return F.conv2d(input, weight * mask, bias, stride, padding, dilation, groups)


def sparse_conv2d(input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, weight_size: Sequence[int],
                  bias: Optional[Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
                  dilation: IntPair = 1, groups: int = 1, residual: Optional[Tensor] = None,
                  relu: bool = False) -> Tensor:
    """``F.conv2d`` with the CSR weight unpacked to dense (repeated entries summed), then
    ``+ residual`` and ``torch.relu`` (which keeps NaN) when asked."""
    weight = unpack_csr(values, row_ptr, col_idx, weight_size)
    out = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def sparse_linear(input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, in_features: int,
                  bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear`` with the CSR weight unpacked to dense."""
    weight = unpack_csr(values, row_ptr, col_idx, (row_ptr.numel() - 1, in_features))
    return F.linear(input, weight, bias)


def max_pool2x2(input: Tensor) -> Tensor:
    """``F.max_pool2d(input, 2, 2)``."""
    return F.max_pool2d(input, 2, 2)
