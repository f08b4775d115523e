"""TwinRep: twin weight reparameterisation during adversarial training, global magnitude pruning.

Paper: C. Li, Q. Qiu, Z. Zhang, J. Guo, X. Cheng, "Learning Adversarially Robust Sparse Networks
via Weight Reparameterization", AAAI 2023. Authors' code: https://github.com/UCAS-LCH/Twin-Rep
(``models/layers.py``, ``train.py``). What is followed and what differs: ``docs/methods.md``
(TwinRep).

Algorithm (pipeline D, AT, global, regularisation-based LWM), as in the authors' code:
  1. reparameterise every masked layer's weight with a second trained factor, both drawn at
     random: unstructured (the authors' ``TwinConv`` / ``TwinLinear``): ``w_eff = w * v * mask``
     with ``v`` shaped like ``w``; structured (the authors' ``ChannelConv`` / ``ChannelLinear``):
     ``w_eff = (A @ w) * mask`` with ``A`` an ``out x out`` matrix mixing the output filters.
     ``v`` / ``A`` get PyTorch's default ``kaiming_uniform_(a=sqrt(5))`` draw, like ``w``; the
     multiplicative dynamics of the two factors under weight decay act as an implicit
     sparsity-inducing penalty on their product;
  2. train adversarially from initialisation; at the pruning epoch (the authors' default: epoch
     10 of 100, i.e. after 10 % of the run) fix the mask by one *global* threshold: unstructured
     on ``|w * v|`` over every masked layer; structured on the group-lasso norm
     ``||(A @ w)_f||_2`` of every conv output filter (no size normalisation, as the authors);
  3. keep training with the mask fixed until the end of the budget; finally fold the factor into
     the weight (``w <- w * v`` or ``A @ w``), so the deployed network has the original structure.

The factors are ``torch.nn.utils.parametrize`` parametrizations of ``weight`` during training,
removed with ``leave_parametrized=True`` at the end.

Budget guarantee: the mask is fixed at the start of epoch ``max(1, round(prune_fraction * E))``
of the ``E = pretrain + prune + finetune`` epochs (one run, one schedule, ``recipe.lr``); if that
leaves no step after pruning (a one-epoch run) it moves to step ``round(prune_fraction * T)``
(at least 1, at most ``T - 1``), so there is always reparameterised training before and masked
training after the pruning step whenever the run has >= 2 steps.

Differences (also in the doc): the authors' structured pruning zeroes the rows of ``A`` once
(they can regrow); here a filter mask keeps them pruned, like every structured method of the
package; structured sparsity is counted in conv weights (the authors count filters); the
recipe's weight decay / schedule replace the authors' 2e-4 and step decay at 70 % / 85 %.
"""
from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .base import PruningMethod
from .context import PruneContext
from .masks import expand_filter_mask, global_masks, unit_masks_global
from .registry import register
from .tags import TaxonomyTags

__all__ = ["TwinRep", "TwinFactor", "ChannelFactor"]


class TwinFactor(nn.Module):
    """Parametrization ``w -> w * v`` with a trained factor ``v`` shaped like ``w``."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.v = nn.Parameter(torch.empty_like(weight))
        nn.init.kaiming_uniform_(self.v, a=math.sqrt(5))

    def forward(self, w: Tensor) -> Tensor:
        return w * self.v


class ChannelFactor(nn.Module):
    """Parametrization ``w -> A @ w`` over output filters, ``A`` an ``out x out`` matrix."""

    def __init__(self, weight: Tensor):
        super().__init__()
        out = weight.shape[0]
        self.A = nn.Parameter(torch.empty(out, out, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, w: Tensor) -> Tensor:
        return (self.A @ w.flatten(1)).view_as(w)


@register
class TwinRep(PruningMethod):
    """TwinRep (Li et al., AAAI'23).

    Args:
        prune_fraction: point of the run (fraction of epochs) where the mask is fixed (authors:
            epoch 10 of 100).
        min_keep: see :class:`PruningMethod`.
    """

    name = "twinrep"
    paper = "Li et al., Learning Adversarially Robust Sparse Networks via Weight Reparameterization, AAAI 2023"
    tags = TaxonomyTags("D", ("AT(PGD)",), None, ("US", "S"), "channels", ("G",), "RELWM")
    structures = ("unstructured", "filter")
    notes = ("structured: filter mask keeps pruned filters at 0 (authors zero rows of A once); "
             "recipe weight decay and LR schedule (authors: 2e-4, step decay)")
    code_url = "https://github.com/UCAS-LCH/Twin-Rep"

    def __init__(self, *, prune_fraction: float = 0.1, min_keep: int = 1):
        if not 0.0 < prune_fraction < 1.0:
            raise ValueError(f"prune_fraction must be in (0, 1), got {prune_fraction}")
        super().__init__(min_keep=min_keep, prune_fraction=prune_fraction)
        self.prune_fraction = prune_fraction

    def _masks(self, ctx: PruneContext) -> List[Tensor]:
        with torch.no_grad():
            prods = [l.weight.detach().clone() for l in ctx.layers]  # parametrized: w * v or A @ w
        if not ctx.structured:
            return global_masks([p.abs() for p in prods], ctx.sparsity, min_keep=self.min_keep)
        metric = [p.flatten(1).norm(dim=1) for p in prods]
        fm = unit_masks_global(metric, [l.weight[0].numel() for l in ctx.layers], ctx.sparsity,
                               min_keep=self.min_keep)
        return [expand_filter_mask(l, m) for l, m in zip(ctx.layers, fm)]

    def prune_step(self, total_epochs: int, steps_per_epoch: int) -> int:
        """The (1-based) step after which the mask is fixed."""
        total = total_epochs * steps_per_epoch
        step = min(max(1, int(round(self.prune_fraction * total_epochs))), max(1, total_epochs)) * steps_per_epoch
        if step >= total and total >= 2:
            step = min(max(1, int(round(self.prune_fraction * total))), total - 1)
        return step

    def _run(self, ctx: PruneContext) -> None:
        total = ctx.recipe.total_epochs
        steps_per_epoch = max(1, math.ceil(len(ctx.data.train) / ctx.recipe.batch_size))
        prune_step = self.prune_step(total, steps_per_epoch)
        factor = ChannelFactor if ctx.structured else TwinFactor
        # Every masked layer is reparameterised (the authors swap all conv / linear layers);
        # only ctx.layers are pruned.
        reparam = list(ctx.all_layers)
        for l in reparam:
            parametrize.register_parametrization(l, "weight", factor(l.weight.detach()))
        first = [l.parametrizations.weight[0] for l in reparam]
        ctx.log["factor_init_std"] = float(torch.stack([
            (f.v if hasattr(f, "v") else f.A).detach().std() for f in first]).mean())
        state = {"n": 0, "pruned": False}

        def prune_now():
            masks = self._masks(ctx)
            with torch.no_grad():
                for l, m in zip(ctx.layers, masks):
                    l.weight_mask.copy_(m.to(l.weight_mask.dtype))
            state["pruned"] = True
            state["at_step"] = state["n"]

        def on_step(step, model):
            state["n"] += 1
            if not state["pruned"] and state["n"] >= prune_step:
                prune_now()

        params = [p for p in ctx.model.parameters() if p.requires_grad]
        try:
            ctx.train("reparameterised AT", total, lr=ctx.recipe.lr, params=params, on_step=on_step)
            if not state["pruned"]:
                prune_now()
        finally:
            for l in reparam:
                if parametrize.is_parametrized(l, "weight"):
                    parametrize.remove_parametrizations(l, "weight", leave_parametrized=True)
        ctx.log["prune_step"] = state.get("at_step")
        ctx.set_masks([l.weight_mask.clone() for l in ctx.layers])
