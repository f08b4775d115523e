"""apb_sparse: adversarial pruning with real sparse inference.

Core API: :func:`sparsify` (swap layers, keep the model's semantics), :func:`deploy` (a frozen,
fast inference snapshot), :func:`densify`, :func:`compact`, :func:`sparsity_report`, the layers
in :mod:`apb_sparse.nn` and the ops in :mod:`apb_sparse.ops`.
"""
from . import nn, ops
# The modules' old import paths (apb_sparse.sparsify, .fuse, .compact, .deploy, .export) are aliases
# of apb_sparse.convert.*; imported first so that the functions below keep their names here.
from . import compact as _compact_module, deploy as _deploy_module, export, fuse, sparsify as _sparsify_module  # noqa: F401,I001
from .convert import (DeployedModel, apply_masks, channel_groups, compact, densify, deploy, export_onnx,
                      magnitude_masks, sparsify, sparsity_report, zero_dead_batchnorm)

__version__ = "0.1.0"

# Heavier subpackages load on first use (``apb_sparse.methods.available()`` works after a plain
# ``import apb_sparse``) without making ``import apb_sparse`` pay for them.
_LAZY = ("methods", "taxonomy", "robustness", "models", "data", "train", "bench", "cli")


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["nn", "ops", "fuse", "sparsify", "deploy", "DeployedModel", "export_onnx", "densify", "compact",
           "sparsity_report", "magnitude_masks", "apply_masks", "channel_groups", "zero_dead_batchnorm"]
