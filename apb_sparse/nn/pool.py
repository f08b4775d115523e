"""Deployment pooling: :class:`MaxPool2x2`, ``nn.MaxPool2d(2, 2)``'s values by a faster route."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

__all__ = ["MaxPool2x2"]


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2, 2)`` for inference: the same values (NaN propagates, an odd last row or
    column is dropped).  Float CPU tensors go through the extension's ``apb_sparse::max_pool2x2``
    (one pass: the maximum of each row pair, then of its column pairs); other tensors through two
    elementwise ``torch.maximum`` passes.  ATen's CPU ``max_pool2d`` on NCHW tensors is slow:
    measured (AMD EPYC Zen 3, 2 threads, float32) on VGG-16's five pool shapes at batch 32, all
    five take 13.2-13.3 ms with ``max_pool2d``, 1.50-1.54 ms with the two maxima and 0.55-0.76 ms
    with the op (VGG-16's pools were over half of its deployed time at 99 % sparsity once).  With gradients enabled on the input it runs the parent's ``max_pool2d``, so
    gradients route to one maximum exactly as the source model's (``torch.maximum`` would split
    them on ties, common after a ReLU).  :func:`apb_sparse.deploy` swaps it in;
    :func:`apb_sparse.densify` swaps it back.
    """

    def __init__(self) -> None:
        super().__init__(2, 2)

    @staticmethod
    def can_replace(module: nn.Module) -> bool:
        """True for exactly ``nn.MaxPool2d(2, 2)`` (no padding, dilation, ceil mode or indices)."""
        return (type(module) is nn.MaxPool2d and _pair(module.kernel_size) == (2, 2)
                and _pair(module.stride if module.stride is not None else module.kernel_size) == (2, 2)
                and _pair(module.padding) == (0, 0) and _pair(module.dilation) == (1, 1)
                and not module.ceil_mode and not module.return_indices)

    def forward(self, input: Tensor) -> Tensor:
        return self.pool(input)

    @staticmethod
    def pool(input: Tensor) -> Tensor:
        """What :meth:`forward` computes (``F.max_pool2d(input, 2, 2)``'s values)."""
        if input.dim() not in (3, 4) or (input.requires_grad and torch.is_grad_enabled()):
            return F.max_pool2d(input, 2, 2)
        if input.device.type == "cpu" and input.dtype in (torch.float32, torch.float64):
            return torch.ops.apb_sparse.max_pool2x2(input)
        h, w = input.shape[-2] // 2 * 2, input.shape[-1] // 2 * 2
        x = input[..., :h, :w]
        cols = torch.maximum(x[..., 0::2], x[..., 1::2])
        return torch.maximum(cols[..., 0::2, :], cols[..., 1::2, :])
