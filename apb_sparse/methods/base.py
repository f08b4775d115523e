"""The base class of the pruning methods (:class:`PruningMethod`), and the names of their shared machinery.

A pruning method turns a model into one whose ``MaskedConv2d`` / ``MaskedLinear`` layers carry final
0/1 masks, with pruned weights exactly zero. It never calls a kernel: the conversion to sparse
layers (``apb_sparse.sparsify``) and the benchmark take it from there.

The machinery lives in one file per job; this module re-exports every name it held before the
split, so ``from apb_sparse.methods.base import X`` keeps working:

* ``recipe.py``: :class:`Recipe`, the training recipe every method shares (and the epoch budget);
* ``tags.py``: :class:`TaxonomyTags`, where a method sits in the survey's taxonomy;
* ``structure.py``: the structures and which weights are prunable (one rule for every method);
* ``masks.py``: exact top-k masks from scores (local / global, weights / filters), the
  straight-through top-k of score learning, installing and measuring masks;
* ``channels.py``: keeping a pruned filter's bias and BatchNorm channel at zero;
* ``context.py``: :class:`PruneContext` (the state of one ``prune`` call) and :class:`PruneResult`;
* ``registry.py``: ``register`` / ``get`` / ``available``.

**Fresh models.** ``prune(model=None, ...)`` builds the architecture with
``apb_sparse.models.get_model(recipe.arch, ...)`` under ``recipe.seed``. A given model is deep-copied
(``inplace=False``). Pipeline-A methods use its weights as the dense starting point; pipeline-B/D
methods use them as their *initialisation*, so when the caller passes ``pretrained=True`` they
re-initialise a copy (``reset_parameters`` of every submodule, under ``recipe.seed``) because their
algorithms start from random weights.
"""
from __future__ import annotations

import copy
import time
from typing import Any, ClassVar, Dict, Optional, Tuple

import torch
from torch import nn

from ..nn.masked import masked_layers, to_masked
from .channels import following_batchnorms, zero_pruned_channels_
from .context import PruneContext, PruneResult, chain_steps
from .masks import (apply_masks, cached_ste_topk, expand_filter_mask, filter_norms, global_masks,
                    install_masks, largest_remainder, local_masks, magnitude_scores,
                    measured_sparsity, ste_topk, topk_mask, topk_mask_cached, unit_masks_global,
                    unit_masks_local)
from .recipe import Recipe
from .registry import available, get, register
from .structure import STRUCTURES, normalize_structure, prunable_layers
from .tags import CRITERIA, TRAINING_TYPES, TaxonomyTags  # noqa: F401 (old import path of the constants)

__all__ = [
    "Recipe", "TaxonomyTags", "PruneResult", "PruneContext", "PruningMethod", "register", "get",
    "available", "STRUCTURES", "normalize_structure", "prunable_layers", "largest_remainder",
    "topk_mask", "local_masks", "global_masks", "unit_masks_local", "unit_masks_global",
    "expand_filter_mask", "filter_norms", "magnitude_scores", "install_masks", "apply_masks", "measured_sparsity",
    "following_batchnorms", "zero_pruned_channels_", "ste_topk", "cached_ste_topk",
    "topk_mask_cached", "chain_steps", "reinitialize_",
]


@torch.no_grad()
def reinitialize_(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw every parameter with the modules' own ``reset_parameters`` under ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if m is not model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
    for _, l in masked_layers(model):
        l.weight_mask.fill_(1.0)
    return model


class PruningMethod:
    """Base class: hyper-parameters in ``__init__``, taxonomy tags as class data, ``prune``.

    Subclasses set ``name``, ``tags``, ``structures`` (supported structures) and implement
    ``_run(ctx)``, which must leave final masks on ``ctx.layers`` (via ``ctx.set_masks``) and no
    ``mask_fn`` installed. ``prune`` does the bookkeeping: copying / building / re-initialising
    the model, seeding, and checking the result.

    Args:
        min_keep: weights (unstructured) or filters (structured) every layer keeps at least.
        **hparams: method-specific hyper-parameters (see each subclass).
    """

    name: ClassVar[str] = ""
    tags: ClassVar[TaxonomyTags]
    structures: ClassVar[Tuple[str, ...]] = ("unstructured",)
    paper: ClassVar[str] = ""
    #: Where this implementation departs from the authors' code (one line, for the leaderboard's
    #: notes column; empty when it follows it). Details: docs/methods.md.
    notes: ClassVar[str] = ""
    #: Authors' public code.
    code_url: ClassVar[str] = ""

    def __init__(self, *, min_keep: int = 1, **hparams):
        if not isinstance(min_keep, int) or min_keep < 0:
            raise ValueError(f"min_keep must be an int >= 0, got {min_keep!r}")
        self.min_keep = min_keep
        self.hparams: Dict[str, Any] = {"min_keep": min_keep, **hparams}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({args})"

    # Hook for subclasses: the work between model preparation and the final check.
    def _run(self, ctx: PruneContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def prune(self, model: Optional[nn.Module], data=None, *, sparsity: float,
              structure: str = "unstructured", recipe: Optional[Recipe] = None,
              pretrained: bool = False) -> PruneResult:
        """Prune (and train) a model to exactly ``sparsity`` of its prunable weights.

        Args:
            model: the network (not modified; a copy is pruned), or None to build
                ``recipe.arch`` with ``get_model``. Conv / Linear layers are converted to masked
                layers. Pipeline-A methods start from its weights; B/D methods use them as the
                initialisation (re-drawn when ``pretrained``).
            data: a ``DatasetBundle`` (``apb_sparse.data.get_dataset``); None loads
                ``recipe.dataset``.
            sparsity: fraction of prunable weights to remove, in [0, 1).
            structure: "unstructured" or "filter" (whole output filters; aliases "structured",
                "channel"); must be in ``self.structures``.
            recipe: the shared :class:`Recipe` (default ``Recipe()``).
            pretrained: the model's weights are already (adversarially) trained: pipeline-A
                methods skip dense pretraining.

        Returns:
            :class:`PruneResult` with the pruned model and a log.

        Raises:
            ValueError: bad ``sparsity`` or unsupported ``structure``.
            TypeError: ``model`` is not an ``nn.Module``.
        """
        structure = normalize_structure(structure)
        if structure not in self.structures:
            raise ValueError(f"{self.name} supports structure in {self.structures}, got {structure!r}")
        if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity must be a float in [0, 1), got {sparsity!r}")
        recipe = Recipe() if recipe is None else recipe
        if not isinstance(recipe, Recipe):
            raise TypeError(f"recipe must be an apb_sparse.methods.Recipe, got {type(recipe).__name__}")
        if data is None:
            data = recipe.load_data()
        if model is None:
            model = recipe.build_model(data)
            pretrained = False
        elif not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        else:
            model = copy.deepcopy(model)
        model = to_masked(model, inplace=True)
        for _, l in masked_layers(model):
            l.mask_fn = None
        if self.tags.pipeline in ("B", "D") and pretrained:
            reinitialize_(model, recipe.seed)
        model.train()

        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            ctx = PruneContext(self, model, data, float(sparsity), structure, recipe, pretrained)
            if not ctx.layers:
                raise ValueError(f"model has no prunable layers for structure {structure!r}")
            self._run(ctx)
            self._finalize(ctx)
        ctx.log["seconds"] = time.perf_counter() - t0
        return PruneResult(model, ctx.log)

    def _finalize(self, ctx: PruneContext) -> None:
        for name, l in masked_layers(ctx.model):
            if l.mask_fn is not None:
                raise RuntimeError(f"{self.name} left a mask_fn installed on layer {name!r}")
            with torch.no_grad():
                l.weight_mask.copy_((l.weight_mask != 0).to(l.weight_mask.dtype))
                l.apply_mask_()
            l.weight.requires_grad_(True)
            if l.bias is not None:
                l.bias.requires_grad_(True)
        for p in ctx.model.parameters():
            p.requires_grad_(True)
        if ctx.structured:
            zero_pruned_channels_(ctx.layers, ctx.bn_of)
        ctx.log["sparsity"] = measured_sparsity(ctx.layers)
        ctx.log["sparsity_all"] = measured_sparsity(ctx.all_layers)
        ctx.log["layer_sparsity"] = {n: l.sparsity for n, l in ctx.named_layers}
