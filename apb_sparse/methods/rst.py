"""RST: robust scratch tickets — adversarially learned masks on a never-trained network.

Paper: Y. Fu, Q. Yu, Y. Zhang, S. Wu, X. Ouyang, D. Cox, Y. Lin, "Drawing Robust Scratch Tickets:
Subnetworks with Inborn Robustness Are Found within Randomly Initialized Networks", NeurIPS 2021.

Algorithm (pipeline B, AT / None, one-shot, local, least-importance-score):
  1. start from a randomly initialised network and freeze all of its weights (and BatchNorm
     affine parameters, which stay at their init 1 / 0, i.e. a non-affine BN as in edge-popup);
  2. learn one score per weight (edge-popup: Kaiming-uniform init) through a straight-through
     per-layer top-k at the target density, with the adversarial loss, for the whole epoch budget
     (``pretrain + prune + finetune`` epochs, at ``recipe.lr``);
  3. the ticket is ``w_init * topk(|s|)``; the weights are never trained.

Choices: weights keep the architecture's own initialisation (RST uses Kaiming-normal, which is
what the models in ``apb_sparse.models`` draw for convs; no signed-constant rescaling). Score
weight decay 1e-4 (edge-popup's default 5e-4 scaled down as in HYDRA). Local (per-layer) top-k
as in edge-popup / RST. The Random RST Switch (R2S) inference trick is not part of pruning and is
not implemented.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import PruneContext, PruningMethod, TaxonomyTags, register
from .hydra import ScoreMasks, freeze_model, local_keep

__all__ = ["RST"]


@register
class RST(PruningMethod):
    """Robust scratch tickets (Fu et al., NeurIPS'21).

    Args:
        score_lr: learning rate of the scores (None: ``recipe.lr``).
        score_weight_decay: weight decay on the scores.
        min_keep: see :class:`PruningMethod`.
    """

    name = "rst"
    paper = "Fu et al., Drawing Robust Scratch Tickets, NeurIPS 2021"
    tags = TaxonomyTags("B", ("AT(PGD)", "None"), "1S", ("US",), None, ("L",), "LIS")
    structures = ("unstructured",)

    def __init__(self, *, score_lr=None, score_weight_decay: float = 1e-4, min_keep: int = 1):
        super().__init__(min_keep=min_keep, score_lr=score_lr, score_weight_decay=score_weight_decay)
        self.score_lr, self.score_weight_decay = score_lr, score_weight_decay

    def _run(self, ctx: PruneContext) -> None:
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
