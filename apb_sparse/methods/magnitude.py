"""Baselines: random pruning and lowest-weight-magnitude (LWM) pruning, one-shot, then AT finetuning.

Algorithm (pipeline A, AT/AT, one-shot):
  1. adversarially pretrain the dense model (skipped for a ``pretrained`` model);
  2. prune once: keep the weights with the largest score, where the score is |w| (``lwm_local``:
     per layer; ``lwm_global``: one threshold over all prunable weights) or uniform noise
     (``random``: per layer, so every layer gets the same sparsity);
  3. finetune the masked network with the recipe's adversarial training for
     ``prune_epochs + finetune_epochs`` epochs (the pruning step itself costs no training, so it
     spends the prune-phase budget finetuning, like every one-shot method here).

Structured variant (``lwm_local`` and ``random`` with ``structure="filter"``): whole output
filters ranked by their L1 norm (Li et al., "Pruning Filters for Efficient ConvNets", ICLR'17),
the same fraction per conv layer; the filter's BatchNorm channel is zeroed with it.

Reference point in the survey: Sehwag et al. 2019 ("Towards compact and robust deep neural
networks") is the adversarial LWM baseline; these are its one-shot versions. Details and the
other methods' fidelity notes: docs/methods.md.
"""
from __future__ import annotations

import torch

from .base import PruningMethod
from .context import PruneContext
from .masks import filter_norms
from .registry import register
from .tags import TaxonomyTags

__all__ = ["RandomPruning", "LWMLocal", "LWMGlobal"]


class _OneShot(PruningMethod):
    local = True

    def _scores(self, ctx: PruneContext):
        raise NotImplementedError

    def _run(self, ctx: PruneContext) -> None:
        ctx.pretrain()
        ctx.set_masks(ctx.unit_scores_to_masks(self._scores(ctx), local=self.local))
        ctx.finetune(ctx.recipe.prune_epochs + ctx.recipe.finetune_epochs)


@register
class RandomPruning(_OneShot):
    """Random masks with the same sparsity in every layer, then adversarial finetuning."""

    name = "random"
    paper = "baseline"
    tags = TaxonomyTags("A", ("AT", "AT"), "1S", ("US", "S"), "filters", ("L",), "random")
    structures = ("unstructured", "filter")

    def _scores(self, ctx):
        gen = torch.Generator().manual_seed(ctx.recipe.seed + 1)
        if ctx.structured:
            return [torch.rand(l.weight.shape[0], generator=gen).to(ctx.device) for l in ctx.layers]
        return [torch.rand(l.weight.shape, generator=gen).to(ctx.device) for l in ctx.layers]


@register
class LWMLocal(_OneShot):
    """Per-layer lowest-|w| pruning (filters: lowest L1 norm), then adversarial finetuning."""

    name = "lwm_local"
    paper = "baseline (Han et al. 2015 magnitude pruning; Li et al. 2017 filter L1 norm)"
    tags = TaxonomyTags("A", ("AT", "AT"), "1S", ("US", "S"), "filters", ("L",), "LWM")
    structures = ("unstructured", "filter")

    def _scores(self, ctx):
        if ctx.structured:
            return [filter_norms(l, p=1) for l in ctx.layers]
        return [l.weight.detach().abs() for l in ctx.layers]


@register
class LWMGlobal(_OneShot):
    """One global |w| threshold over all prunable weights, then adversarial finetuning."""

    name = "lwm_global"
    paper = "baseline (global magnitude pruning)"
    tags = TaxonomyTags("A", ("AT", "AT"), "1S", ("US",), None, ("G",), "LWM")
    structures = ("unstructured",)
    local = False

    def _scores(self, ctx):
        return [l.weight.detach().abs() for l in ctx.layers]
