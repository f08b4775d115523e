"""RST: robust scratch tickets — adversarially learned masks on a never-trained network.

Paper: Y. Fu, Q. Yu, Y. Zhang, S. Wu, X. Ouyang, D. Cox, Y. Lin, "Drawing Robust Scratch Tickets:
Subnetworks with Inborn Robustness Are Found within Randomly Initialized Networks", NeurIPS 2021.
Authors' code: https://github.com/GATECH-EIC/Robust-Scratch-Ticket (built on edge-popup). What
follows the authors and what does not, with every scale-down: docs/methods.md (section RST).

Algorithm (pipeline B, AT / None, one-shot, local, least-importance-score):
  1. start from a randomly initialised network and replace every prunable weight by the
     *signed constant* ``sign(w) * gain / sqrt(fan_in)`` (``gain = sqrt(2)``, ReLU): the authors'
     configs (``init: signed_constant``, ``mode: fan_in``, ``scale_fan`` off); biases of the
     prunable layers are zero (the authors' convs and their 1x1-conv classifier have none);
     freeze all weights and the BatchNorm affine parameters, which stay at 1 / 0 (the authors'
     ``NonAffineBatchNorm``); running statistics update (train mode);
  2. learn one score per weight (edge-popup: Kaiming-uniform init, ``a = sqrt(5)``) through a
     straight-through per-layer top-k of ``|s|`` at the target density, with the adversarial
     loss, for the whole epoch budget (``pretrain + prune + finetune`` epochs, at ``recipe.lr``
     like the authors' 0.1), score weight decay 5e-4 (the authors' config);
  3. the ticket is ``w_init * topk(|s|)``; the weights are never trained.

Minimum algorithmic steps: one score-learning epoch (the whole budget is score learning; every
preset has several epochs).

Differences from the authors, and why: the learning-rate schedule is the recipe's (authors:
``cifar_piecewise``) and the attack is the recipe's training attack (authors: PGD-7), so all
methods share one recipe; the first conv and the classifier are pruned like every layer (as in
the authors' default, no ``--first-layer-dense`` / ``--last-layer-dense``). The Random RST Switch
(R2S) inference trick is not part of pruning and is not implemented. ``weight_init="model"``
keeps the architecture's own initialisation (the behaviour of an earlier version).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import PruningMethod
from .context import PruneContext
from .registry import register
from .tags import TaxonomyTags
from .hydra import ScoreMasks, freeze_model, local_keep

__all__ = ["RST", "signed_constant_"]

_INITS = ("signed_constant", "kaiming_normal", "model")


@torch.no_grad()
def signed_constant_(layer: nn.Module) -> None:
    """Edge-popup's signed-constant init: ``w = sign(w) * sqrt(2) / sqrt(fan_in)`` in place."""
    w = layer.weight
    std = math.sqrt(2.0) / math.sqrt(max(1, w[0].numel()))
    sign = torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))  # sign(0) -> +1
    w.copy_(sign * std)


@register
class RST(PruningMethod):
    """Robust scratch tickets (Fu et al., NeurIPS'21).

    Args:
        weight_init: "signed_constant" (the authors' configs), "kaiming_normal" (edge-popup's
            command-line default) or "model" (keep the architecture's initialisation).
        zero_bias: zero the biases of the prunable layers (the authors' layers have none).
        score_lr: learning rate of the scores (None: ``recipe.lr``).
        score_weight_decay: weight decay on the scores (the authors' 5e-4).
        min_keep: see :class:`PruningMethod`.
    """

    name = "rst"
    paper = "Fu et al., Drawing Robust Scratch Tickets, NeurIPS 2021"
    code_url = "https://github.com/GATECH-EIC/Robust-Scratch-Ticket"
    notes = "recipe LR schedule and training attack (authors: piecewise LR, PGD-7)"
    tags = TaxonomyTags("B", ("AT(PGD)", "None"), "1S", ("US",), None, ("L",), "LIS")
    structures = ("unstructured",)

    def __init__(self, *, weight_init: str = "signed_constant", zero_bias: bool = True,
                 score_lr=None, score_weight_decay: float = 5e-4, min_keep: int = 1):
        if weight_init not in _INITS:
            raise ValueError(f"weight_init must be one of {_INITS}, got {weight_init!r}")
        super().__init__(min_keep=min_keep, weight_init=weight_init, zero_bias=zero_bias,
                         score_lr=score_lr, score_weight_decay=score_weight_decay)
        self.weight_init, self.zero_bias = weight_init, bool(zero_bias)
        self.score_lr, self.score_weight_decay = score_lr, score_weight_decay

    @torch.no_grad()
    def _init_weights(self, ctx: PruneContext) -> None:
        for l in ctx.layers:
            if self.weight_init == "signed_constant":
                signed_constant_(l)
            elif self.weight_init == "kaiming_normal":
                nn.init.kaiming_normal_(l.weight, mode="fan_in", nonlinearity="relu")
            if self.zero_bias and l.bias is not None:
                l.bias.zero_()

    def _run(self, ctx: PruneContext) -> None:
        self._init_weights(ctx)
        scores = []
        for l in ctx.layers:
            s = torch.empty_like(l.weight)
            nn.init.kaiming_uniform_(s, a=math.sqrt(5))
            scores.append(s)
        sm = ScoreMasks(ctx.layers, scores, local_keep(ctx.layers, ctx.sparsity, self.min_keep))
        first = sm.masks()
        frozen = freeze_model(ctx.model)
        sm.install()
        try:
            ctx.train("scores (ticket search)", ctx.recipe.total_epochs, params=sm.scores,
                      lr=self.score_lr if self.score_lr is not None else ctx.recipe.lr,
                      config_overrides={"weight_decay": self.score_weight_decay})
        finally:
            sm.remove()
            for p in frozen:
                p.requires_grad_(True)
        ctx.log["score_change"] = sm.relative_change()
        ctx.log["mask_change"] = sm.mask_change(first)
        ctx.set_masks(sm.masks())
        ctx.log["phases"].append({"phase": "training step", "epochs": 0, "skipped": "RST trains no weights"})
