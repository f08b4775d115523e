"""Pieces shared by the architectures: the embedded input normalisation."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Normalize", "default_stats", "CIFAR10_MEAN", "CIFAR10_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def default_stats(in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) used when a model is built without explicit statistics.

    Three channels get the CIFAR-10 statistics; any other channel count gets 0.5 / 0.5, which
    maps [0, 1] inputs to [-1, 1].
    """
    if in_channels == 3:
        return CIFAR10_MEAN, CIFAR10_STD
    return (0.5,) * in_channels, (0.5,) * in_channels


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with ``mean`` and ``std`` stored as buffers.

    Every model starts with this module so that it takes plain [0, 1] images, as attacks such as
    AutoAttack expect; the statistics travel with the state dict.

    Args:
        mean: per-channel means (length ``in_channels``).
        std: per-channel standard deviations (positive, length ``in_channels``).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"mean has {mean_t.numel()} entries but std has {std_t.numel()}")
        if bool((std_t <= 0).any()):
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def make_normalize(in_channels: int, mean: Optional[Sequence[float]],
                   std: Optional[Sequence[float]]) -> Normalize:
    """Build the input normalisation, checking that the statistics fit ``in_channels``."""
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    d_mean, d_std = default_stats(in_channels)
    mean = d_mean if mean is None else tuple(float(m) for m in mean)
    std = d_std if std is None else tuple(float(s) for s in std)
    if len(mean) == 1 and in_channels > 1:
        mean = mean * in_channels
    if len(std) == 1 and in_channels > 1:
        std = std * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} entries (in_channels), got {len(mean)} and {len(std)}")
    return Normalize(mean, std)


def check_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
