"""Robust Bird: early-bird ticket drawn during adversarial training, then the sparse net is trained.

Paper: T. Chen, Z. Zhang, P. Wang, S. Balachandra, H. Ma, Z. Wang, Z. Wang, "Sparsity Winning
Twice: Better Robust Generalization from More Efficient Training", ICLR 2022 (Robust Bird).

Algorithm (pipeline B, AT / AT, iterative search, global, LWM):
  1. adversarially train the dense network from initialisation; every ``check_every`` steps draw
     the global magnitude mask at the target sparsity and measure its normalised Hamming distance
     to the previous draw;
  2. when the last ``window`` distances are all below ``tol`` (mask converged: the "early bird")
     or ``prune_epochs`` are used up, fix the latest mask;
  3. train the fixed sparse network adversarially for ``pretrain_epochs + finetune_epochs`` at
     ``recipe.lr``, continuing from the current weights.

Choices: ``tol = 0.1`` and a window of 5 draws (early-bird defaults); draws every
``max(1, steps_per_epoch // 4)`` steps by default (the paper draws once per epoch over a long
schedule); the search stops by raising an internal exception out of train.py's step callback,
so the cosine schedule of the search is cut short; no weight rewinding.
"""
from __future__ import annotations

import math
from collections import deque

import torch

from .base import PruneContext, PruningMethod, TaxonomyTags, global_masks, register

__all__ = ["RobustBird"]


class _EarlyBird(Exception):
    pass


@register
class RobustBird(PruningMethod):
    """Robust Bird (Chen et al., ICLR'22).

    Args:
        tol: mask-distance threshold of convergence.
        window: consecutive draws that must be below ``tol``.
        check_every: steps between mask draws (None: a quarter epoch).
        search_mode: training mode of the search (None: the recipe's).
        min_keep: see :class:`PruningMethod`.
    """

    name = "robustbird"
    paper = "Chen et al., Sparsity Winning Twice, ICLR 2022 (Robust Bird)"
    tags = TaxonomyTags("B", ("AT(PGD)", "AT(PGD)"), "IT", ("US",), None, ("G",), "LWM")
    structures = ("unstructured",)

    def __init__(self, *, tol: float = 0.1, window: int = 5, check_every=None, search_mode=None,
                 min_keep: int = 1):
        super().__init__(min_keep=min_keep, tol=tol, window=window, check_every=check_every,
                         search_mode=search_mode)
        self.tol, self.window, self.check_every, self.search_mode = tol, window, check_every, search_mode

    def _draw(self, ctx):
        return global_masks([l.weight.detach().abs() for l in ctx.layers], ctx.sparsity,
                            min_keep=self.min_keep)

    def _run(self, ctx: PruneContext) -> None:
        steps_per_epoch = max(1, math.ceil(len(ctx.data.train) / ctx.recipe.batch_size))
        every = self.check_every or max(1, steps_per_epoch // 4)
        state = {"n": 0, "prev": self._draw(ctx), "dists": deque(maxlen=self.window), "history": []}
        n_total = sum(l.weight.numel() for l in ctx.layers)

        def on_step(step, model):
            state["n"] += 1
            if state["n"] % every:
                return
            cur = self._draw(ctx)
            d = sum(float((a != b).sum()) for a, b in zip(cur, state["prev"])) / n_total
            state["prev"] = cur
            state["dists"].append(d)
            state["history"].append(d)
            if len(state["dists"]) == self.window and max(state["dists"]) < self.tol:
                raise _EarlyBird()

        stopped = False
        try:
            ctx.train("ticket search", ctx.recipe.prune_epochs, mode=self.search_mode, lr=ctx.recipe.lr,
                      on_step=on_step)
        except _EarlyBird:
            stopped = True
        ctx.log["early_bird_step"] = state["n"] if stopped else None
        ctx.log["mask_distances"] = state["history"]
        ctx.set_masks(self._draw(ctx))
        ctx.train("train ticket", ctx.recipe.pretrain_epochs + ctx.recipe.finetune_epochs, lr=ctx.recipe.lr)
