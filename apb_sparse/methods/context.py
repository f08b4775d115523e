"""The state of one ``prune`` call (:class:`PruneContext`) and what it returns (:class:`PruneResult`).

``PruneContext`` is what a method's ``_run`` works with: the model's prunable layers, the training
phases of the shared recipe (through ``apb_sparse.train.train``) and the installation of masks for
the call's structure and locality.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..nn.masked import masked_layers
from ..train import train
from .channels import following_batchnorms, zero_pruned_channels_
from .masks import (expand_filter_mask, global_masks, install_masks, local_masks, unit_masks_global,
                    unit_masks_local)
from .recipe import Recipe
from .structure import prunable_layers

if TYPE_CHECKING:  # base.py imports this module, so a runtime import would be a cycle
    from .base import PruningMethod

__all__ = ["PruneResult", "PruneContext", "chain_steps"]


def chain_steps(*fns: Optional[Callable]) -> Optional[Callable]:
    """Combine several ``on_step(step, model)`` callbacks (None entries skipped)."""
    fns = [f for f in fns if f is not None]
    if not fns:
        return None

    def on_step(step, model):
        for f in fns:
            f(step, model)
    return on_step


@dataclass
class PruneResult:
    """What ``PruningMethod.prune`` returns.

    Attributes:
        model: the pruned model (Masked layers with final masks, pruned weights zero).
        log: ``method``, ``structure``, ``target_sparsity``, ``sparsity`` (measured over the
            prunable weights), ``sparsity_all`` (over every masked layer), ``phases`` (a list of
            dicts with the phase name, its epochs and train.py's log), ``seconds`` and
            method-specific entries.
    """

    model: nn.Module
    log: Dict[str, Any] = field(default_factory=dict)


class PruneContext:
    """State of one ``prune`` call, handed to ``PruningMethod._run``.

    Attributes: ``model``, ``data``, ``sparsity``, ``structure``, ``recipe``, ``pretrained``,
    ``log``; ``layers`` (prunable layers), ``all_layers`` (every masked layer).
    """

    def __init__(self, method: "PruningMethod", model: nn.Module, data, sparsity: float,
                 structure: str, recipe: Recipe, pretrained: bool):
        self.method = method
        self.model = model
        self.data = data
        self.sparsity = float(sparsity)
        self.structure = structure
        self.recipe = recipe
        self.pretrained = pretrained
        self.log: Dict[str, Any] = {"method": method.name, "structure": structure,
                                    "target_sparsity": self.sparsity, "phases": [],
                                    "hparams": dict(method.hparams)}
        self.named_layers = prunable_layers(model, structure)
        self.layers = [l for _, l in self.named_layers]
        self.all_layers = [l for _, l in masked_layers(model)]
        self._bn_of: Optional[Dict[nn.Module, nn.Module]] = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def structured(self) -> bool:
        return self.structure == "filter"

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps in one epoch of this call's data at ``recipe.batch_size``."""
        return max(1, math.ceil(len(self.data.train) / self.recipe.batch_size))

    def example_input(self, n: int = 2) -> Tensor:
        shape = tuple(getattr(self.data, "input_shape", (3, 32, 32)))
        return torch.zeros((n,) + shape, device=self.device)

    @property
    def bn_of(self) -> Dict[nn.Module, nn.Module]:
        if self._bn_of is None:
            self._bn_of = following_batchnorms(self.model, self.example_input())
        return self._bn_of

    def channel_hook(self) -> Optional[Callable]:
        """``on_step`` that keeps pruned channels (bias, BN) at zero; None when unstructured."""
        if not self.structured:
            return None
        bn_of = self.bn_of
        layers = self.layers

        def on_step(step, model):
            zero_pruned_channels_(layers, bn_of)
        return on_step

    def train(self, phase: str, epochs: int, *, mode: Optional[str] = None, lr: Optional[float] = None,
              params=None, loss_fn=None, extra_loss=None, on_step=None, config_overrides=None):
        """Run one phase with ``apb_sparse.train.train`` and record it in the log."""
        entry = {"phase": phase, "epochs": int(epochs), "mode": mode or self.recipe.mode}
        self.log["phases"].append(entry)
        if epochs <= 0:
            return None
        config = self.recipe.train_config(epochs, mode=mode, lr=lr, **(config_overrides or {}))
        # The optimisation budget of the phase (the benchmark compares pipelines by it).
        entry.update(lr=float(config.lr), scheduler=config.scheduler)
        t0 = time.perf_counter()
        tlog = train(self.model, self.data, config, params=params, loss_fn=loss_fn,
                     extra_loss=extra_loss, on_step=chain_steps(on_step, self.channel_hook()),
                     progress=self.recipe.progress)
        entry["seconds"] = time.perf_counter() - t0
        entry["steps"] = int(tlog.steps)
        entry["train_log"] = tlog
        return tlog

    def pretrain(self) -> None:
        """Pipeline A's dense pretraining (skipped for a pretrained model)."""
        if self.pretrained:
            self.log["phases"].append({"phase": "pretrain", "epochs": 0, "skipped": "pretrained"})
            return
        self.train("pretrain", self.recipe.pretrain_epochs, lr=self.recipe.lr)

    def finetune(self, epochs: Optional[int] = None, **kw):
        """Masked finetuning at ``recipe.finetune_lr`` (masks fixed; train re-applies them)."""
        e = self.recipe.finetune_epochs if epochs is None else epochs
        kw.setdefault("lr", self.recipe.finetune_lr)
        return self.train("finetune", e, **kw)

    # -------------------------------------------------------------- mask construction
    def unit_scores_to_masks(self, layer_scores: Sequence[Tensor], *, local: bool,
                             sparsity: Optional[float] = None) -> List[Tensor]:
        """Turn per-weight scores into final masks for this call's structure and locality.

        For ``structure="filter"`` the scores are reduced per output filter (L2 norm of the
        per-weight scores) unless they already have one entry per filter.
        """
        s = self.sparsity if sparsity is None else sparsity
        min_keep = self.method.min_keep
        if not self.structured:
            return (local_masks if local else global_masks)(layer_scores, s, min_keep=min_keep)
        unit = [sc if sc.dim() == 1 else sc.flatten(1).norm(dim=1) for sc in layer_scores]
        sizes = [l.weight[0].numel() for l in self.layers]
        fm = (unit_masks_local if local else unit_masks_global)(unit, sizes, s, min_keep=min_keep)
        return [expand_filter_mask(l, m) for l, m in zip(self.layers, fm)]

    def set_masks(self, masks: Sequence[Tensor]) -> None:
        install_masks(self.layers, masks)
        if self.structured:
            zero_pruned_channels_(self.layers, self.bn_of)
