"""Architectures. Every model embeds its input normalisation and takes [0, 1] images.

Use ``get_model(name, num_classes=10, in_channels=3, **kw)``; ``available_models()`` lists names.
Besides this package's own architectures, names with a prefix select:

* ``robustbench:<arch>``: CIFAR architectures in RobustBench's checkpoint key layout
  (``wrn28_10``, ``wrn34_10``, ``preact_resnet18``, ``preact_resnet18_v2``), so that RobustBench's
  checkpoint files load as they are (:mod:`.robustbench`);
* ``timm:<name>``: any timm model (optional dependency, :mod:`.timm_models`).

``adapt_state_dict(name, state)`` renames a foreign checkpoint's keys for ``name`` where the
layouts differ only in naming (RobustBench's ``mu`` / ``sigma``, a bare timm model's keys).
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Mapping, Tuple

from torch import Tensor, nn

from . import robustbench as _rb
from . import timm_models as _timm
from .common import CIFAR10_MEAN, CIFAR10_STD, Normalize, default_stats
from .resnet import PreActResNet, ResNet, preact_resnet18, resnet18
from .robustbench import RobustBenchPreActResNet, RobustBenchWideResNet
from .small_cnn import SmallCNN, small_cnn
from .timm_models import TimmModel, timm_available
from .vgg import VGG, vgg16
from .wide_resnet import WideResNet, wrn28_4, wrn28_10, wrn34_10

__all__ = ["get_model", "available_models", "canonical_name", "adapt_state_dict", "Normalize", "default_stats",
           "ResNet", "PreActResNet", "VGG", "WideResNet", "SmallCNN", "RobustBenchWideResNet",
           "RobustBenchPreActResNet", "TimmModel", "timm_available", "resnet18", "preact_resnet18", "vgg16",
           "wrn28_4", "wrn28_10", "wrn34_10", "small_cnn", "CIFAR10_MEAN", "CIFAR10_STD", "RB_PREFIX",
           "TIMM_PREFIX"]

RB_PREFIX = "robustbench:"
TIMM_PREFIX = _timm.PREFIX

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "preact_resnet18": preact_resnet18,
    "vgg16": vgg16,
    "wrn28_4": wrn28_4,
    "wrn28_10": wrn28_10,
    "wrn34_10": wrn34_10,
    "small_cnn": small_cnn,
}
_REGISTRY.update({RB_PREFIX + k: v for k, v in _rb.ROBUSTBENCH_ARCHS.items()})


def available_models() -> List[str]:
    """Names accepted by :func:`get_model` (plus ``timm:<name>`` for any timm model)."""
    return sorted(_REGISTRY)


def canonical_name(name: str) -> str:
    """The registry spelling of ``name``: case-insensitive, "-" read as "_", ``wrn-28-10`` as
    ``wrn28_10``; a ``timm:`` name keeps timm's spelling.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: unknown name (the message lists the known ones).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name.lower().startswith(TIMM_PREFIX):
        rest = name[len(TIMM_PREFIX):]
        if not rest:
            raise ValueError(f"expected a timm model name after {TIMM_PREFIX!r}, e.g. 'timm:resnet18'")
        return TIMM_PREFIX + rest
    key = name.lower().replace("-", "_")
    key = re.sub(r"wrn_?(\d+)_(\d+)", r"wrn\1_\2", key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; expected one of {available_models()} "
                         f"or '{TIMM_PREFIX}<timm model name>'")
    return key


def get_model(name: str, num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module:
    """Build an architecture by name.

    Args:
        name: one of :func:`available_models` (case-insensitive; "-" is read as "_"), or
            ``timm:<name>`` for a timm model (needs ``pip install timm``).
        num_classes: output size.
        in_channels: input channels.
        **kw: model-specific options, e.g. ``mean`` / ``std`` (normalisation statistics, see
            ``DatasetBundle.mean``), ``width`` (resnets, small_cnn), ``dropout``, ``depth`` and
            ``widen`` (wrn*), ``timm.create_model`` options for timm models.

    Returns:
        A freshly initialised ``nn.Module`` taking ``[N, in_channels, H, W]`` images in [0, 1].

    Raises:
        ValueError: unknown ``name`` or invalid option.
        TypeError: an option the architecture does not take.
        ImportError: a ``timm:`` name without timm installed.
    """
    key = canonical_name(name)
    if key.startswith(TIMM_PREFIX):
        return _timm.timm_model(key[len(TIMM_PREFIX):], num_classes=num_classes, in_channels=in_channels, **kw)
    fn = _REGISTRY[key]
    try:
        return fn(num_classes=num_classes, in_channels=in_channels, **kw)
    except TypeError as e:
        # e.g. "__init__() got an unexpected keyword argument 'widht'": name the architecture.
        raise TypeError(f"model {key!r} does not take the options {sorted(kw)}: {e}") from None


def adapt_state_dict(name: str, state: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    """``state`` with the key renames that ``name``'s checkpoints from other tools need, and a note
    per change (empty for this package's own layouts).

    ``robustbench:*``: ``mu`` / ``sigma`` -> ``normalize.mean`` / ``normalize.std``, unused
    ``sub_block1.*`` dropped.  ``timm:*``: a bare timm state dict gets the ``model.`` prefix.
    """
    key = canonical_name(name)
    if key.startswith(RB_PREFIX):
        return _rb.adapt_state_dict(state)
    if key.startswith(TIMM_PREFIX):
        return _timm.adapt_state_dict(state)
    return dict(state), []
