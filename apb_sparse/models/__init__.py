"""Architectures. Every model embeds its input normalisation and takes [0, 1] images.

Use ``get_model(name, num_classes=10, in_channels=3, **kw)``; ``available_models()`` lists names.
"""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from .common import CIFAR10_MEAN, CIFAR10_STD, Normalize, default_stats
from .resnet import PreActResNet, ResNet, preact_resnet18, resnet18
from .small_cnn import SmallCNN, small_cnn
from .vgg import VGG, vgg16
from .wide_resnet import WideResNet, wrn28_4

__all__ = ["get_model", "available_models", "Normalize", "default_stats", "ResNet", "PreActResNet",
           "VGG", "WideResNet", "SmallCNN", "resnet18", "preact_resnet18", "vgg16", "wrn28_4",
           "small_cnn", "CIFAR10_MEAN", "CIFAR10_STD"]

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "preact_resnet18": preact_resnet18,
    "vgg16": vgg16,
    "wrn28_4": wrn28_4,
    "small_cnn": small_cnn,
}


def available_models() -> list[str]:
    """Names accepted by :func:`get_model`."""
    return sorted(_REGISTRY)


def get_model(name: str, num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module:
    """Build an architecture by name.

    Args:
        name: one of :func:`available_models` (case-insensitive; "-" is read as "_").
        num_classes: output size.
        in_channels: input channels.
        **kw: model-specific options, e.g. ``mean`` / ``std`` (normalisation statistics, see
            ``DatasetBundle.mean``), ``width`` (resnets, small_cnn), ``dropout`` (wrn28_4).

    Returns:
        A freshly initialised ``nn.Module`` taking ``[N, in_channels, H, W]`` images in [0, 1].

    Raises:
        ValueError: unknown ``name`` or invalid option.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; expected one of {available_models()}")
    return _REGISTRY[key](num_classes=num_classes, in_channels=in_channels, **kw)
