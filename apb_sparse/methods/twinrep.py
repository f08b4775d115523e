"""TwinRep: twin weight reparameterisation during adversarial training, global magnitude pruning.

Paper: C. Li, Q. Qiu, Z. Zhang, J. Guo, X. Cheng, "Learning Adversarially Robust Sparse Networks
via Weight Reparameterization", AAAI 2023.

Algorithm (pipeline D, AT, global, regularisation-based LWM):
  1. reparameterise every prunable weight as the product ``w * v`` of two trained factors (the
     network computes with ``w * v * mask``); weight decay on both factors acts as an implicit
     sparsity-inducing (L1-like) penalty on the product, without changing the robust objective;
  2. train adversarially from initialisation; at the pruning epoch fix the mask by one *global*
     magnitude threshold on ``|w * v|`` (structured: the group-lasso metric of each filter,
     ``||w_f * v_f||_2 / sqrt(size)``, against one global threshold);
  3. keep training with the mask fixed until the end of the budget; finally fold ``v`` into ``w``
     (the deployed network has the original structure).

Choices: ``v`` starts at 1 so the network starts as the plain initialisation (the paper's exact
init is not known to us); the structured variant uses one factor per output filter (a per-channel
scale, our simplified stand-in for the paper's Channel-Rep matrix factor). The pruning epoch is
``prune_fraction`` (default 0.1, the paper's epoch 10 of ~100) of the whole run, at least one
epoch; the whole budget ``pretrain + prune + finetune`` epochs is one training run (one cosine
schedule) at ``recipe.lr``.
"""
from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor, nn

from .base import (PruneContext, PruningMethod, TaxonomyTags, expand_filter_mask, global_masks,
                   register, unit_masks_global)

__all__ = ["TwinRep"]


@register
class TwinRep(PruningMethod):
    """TwinRep (Li et al., AAAI'23).

    Args:
        prune_fraction: point of the run (fraction of epochs) where the mask is fixed.
        min_keep: see :class:`PruningMethod`.
    """

    name = "twinrep"
    paper = "Li et al., Learning Adversarially Robust Sparse Networks via Weight Reparameterization, AAAI 2023"
    tags = TaxonomyTags("D", ("AT(PGD)",), None, ("US", "S"), "channels", ("G",), "RELWM")
    structures = ("unstructured", "filter")

    def __init__(self, *, prune_fraction: float = 0.1, min_keep: int = 1):
        if not 0.0 < prune_fraction < 1.0:
            raise ValueError(f"prune_fraction must be in (0, 1), got {prune_fraction}")
        super().__init__(min_keep=min_keep, prune_fraction=prune_fraction)
        self.prune_fraction = prune_fraction

    def _masks(self, ctx: PruneContext, twins: List[Tensor]) -> List[Tensor]:
        prods = [l.weight.detach() * (v.detach().view(-1, *([1] * (l.weight.dim() - 1))) if ctx.structured
                                      else v.detach()) for l, v in zip(ctx.layers, twins)]
        if not ctx.structured:
            return global_masks([p.abs() for p in prods], ctx.sparsity, min_keep=self.min_keep)
        metric = [p.flatten(1).norm(dim=1) / math.sqrt(p[0].numel()) for p in prods]
        fm = unit_masks_global(metric, [l.weight[0].numel() for l in ctx.layers], ctx.sparsity,
                               min_keep=self.min_keep)
        return [expand_filter_mask(l, m) for l, m in zip(ctx.layers, fm)]

    def _run(self, ctx: PruneContext) -> None:
        total = ctx.recipe.total_epochs
        prune_epoch = min(max(1, int(round(self.prune_fraction * total))), max(1, total))
        steps_per_epoch = max(1, math.ceil(len(ctx.data.train) / ctx.recipe.batch_size))
        prune_step = prune_epoch * steps_per_epoch
        twins = [nn.Parameter(torch.ones(l.weight.shape[0], device=ctx.device, dtype=l.weight.dtype)
                              if ctx.structured else torch.ones_like(l.weight)) for l in ctx.layers]
        for l, v in zip(ctx.layers, twins):
            if ctx.structured:
                l.mask_fn = (lambda lay, v=v: lay.weight_mask * v.view(-1, *([1] * (lay.weight.dim() - 1))))
            else:
                l.mask_fn = (lambda lay, v=v: lay.weight_mask * v)
        state = {"n": 0, "pruned": False}

        def prune_now():
            masks = self._masks(ctx, twins)
            with torch.no_grad():
                for l, m in zip(ctx.layers, masks):
                    l.weight_mask.copy_(m)
                    l.apply_mask_()
            state["pruned"] = True
            state["at_step"] = state["n"]

        def on_step(step, model):
            state["n"] += 1
            if not state["pruned"] and state["n"] >= prune_step:
                prune_now()

        params = [p for p in ctx.model.parameters() if p.requires_grad] + twins
        try:
            ctx.train("reparameterised AT", total, lr=ctx.recipe.lr, params=params, on_step=on_step)
            if not state["pruned"]:
                prune_now()
        finally:
            with torch.no_grad():
                for l, v in zip(ctx.layers, twins):
                    l.mask_fn = None
                    scale = v.view(-1, *([1] * (l.weight.dim() - 1))) if ctx.structured else v
                    l.weight.mul_(scale)
        ctx.log["prune_step"] = state.get("at_step")
        ctx.set_masks([l.weight_mask.clone() for l in ctx.layers])
