"""Convolution arguments shared by the masked and sparse layers: padding plans and input shapes.

The kernels take symmetric zero padding.  Every other padding ``nn.Conv2d`` accepts (``"same"``,
including its asymmetric case, ``"valid"``, and ``padding_mode`` ``"reflect"`` / ``"replicate"`` /
``"circular"``) is applied explicitly with ``F.pad`` before a zero-padding-free kernel call, as
``nn.Conv2d`` itself does for the non-zero modes.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch.nn.functional as F
from torch import Tensor

from .. import ops

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

Padding = Union[str, int, Sequence[int]]


class PaddingPlan:
    """How a layer pads: ``kernel`` (symmetric zero padding the kernel applies) and, when needed,
    ``pre`` (an ``F.pad`` tuple ``(left, right, top, bottom)``) with ``mode``."""

    __slots__ = ("kernel", "pre", "mode")

    def __init__(self, kernel: Tuple[int, int], pre: Optional[Tuple[int, int, int, int]], mode: Optional[str]):
        self.kernel, self.pre, self.mode = kernel, pre, mode

    def apply(self, input: Tensor) -> Tensor:
        if self.pre is None:
            return input
        if self.mode == "constant":
            return F.pad(input, self.pre)
        return F.pad(input, self.pre, mode=self.mode)


def normalize_padding(padding: Padding) -> Union[str, Tuple[int, int]]:
    """``"same"`` / ``"valid"`` or a pair of non-negative ints (what ``nn.Conv2d`` stores)."""
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same', 'valid' or non-negative ints, got {padding!r}")
        return padding
    return tuple(ops._pair("padding", padding, 0))


def padding_plan(kernel_size: Sequence[int], stride: Sequence[int], padding: Union[str, Sequence[int]],
                 dilation: Sequence[int], padding_mode: str) -> PaddingPlan:
    """The :class:`PaddingPlan` equivalent to ``nn.Conv2d``'s handling of these arguments."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if isinstance(padding, str):
        if padding == "valid":
            pads = [(0, 0), (0, 0)]
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"padding='same' is not supported for strided convolutions (stride={tuple(stride)})")
            pads = []
            for d, k in zip(dilation, kernel_size):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))  # the odd pixel goes last, as in torch
        else:
            raise ValueError(f"padding must be 'same', 'valid' or non-negative ints, got {padding!r}")
    else:
        pads = [(int(p), int(p)) for p in padding]
    (top, bottom), (left, right) = pads
    if padding_mode == "zeros" and top == bottom and left == right:
        return PaddingPlan((top, left), None, None)
    if top == bottom == left == right == 0:
        return PaddingPlan((0, 0), None, None)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    return PaddingPlan((0, 0), (left, right, top, bottom), mode)


def batched(input: object, layer: str) -> Tuple[Tensor, bool]:
    """``(input as 4-D, was_unbatched)``: a 3-D ``(C, H, W)`` input gets a batch of one, as in ``nn.Conv2d``."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{layer}: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() == 4:
        return input, False
    if input.dim() == 3:
        return input.unsqueeze(0), True
    raise ValueError(f"{layer}: input must be 3-D (C, H, W) or 4-D (N, C, H, W), got shape {tuple(input.shape)}")
