"""apb_sparse: adversarial pruning with real sparse inference.

Core API: :func:`sparsify` (swap layers, keep the model's semantics), :func:`deploy` (a frozen,
fast inference snapshot), :func:`densify`, :func:`compact`, :func:`sparsity_report`, the layers
in :mod:`apb_sparse.nn` and the ops in :mod:`apb_sparse.ops`.
"""
from . import fuse, nn, ops
from .compact import channel_groups, compact, zero_dead_batchnorm
from .deploy import DeployedModel, deploy
from .export import export_onnx
from .sparsify import (apply_masks, densify, magnitude_masks, sparsify, sparsity_report)

__version__ = "0.1.0"

# Heavier subpackages load on first use (``apb_sparse.methods.available()`` works after a plain
# ``import apb_sparse``) without making ``import apb_sparse`` pay for them.
_LAZY = ("methods", "taxonomy", "robustness", "models", "data", "train", "bench", "cli")


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["nn", "ops", "fuse", "sparsify", "deploy", "DeployedModel", "export_onnx", "densify", "compact", "sparsity_report", "magnitude_masks", "apply_masks",
           "channel_groups", "zero_dead_batchnorm"]
