"""Robust Bird: early-bird ticket found by cheap training, then the sparse net is trained with AT.

Paper: T. Chen, Z. Zhang, P. Wang, S. Balachandra, H. Ma, Z. Wang, Z. Wang, "Sparsity Winning
Twice: Better Robust Generalization from More Efficient Training", ICLR 2022 (Robust Bird).
Authors' code: https://github.com/VITA-Group/Sparsity-Win-Robust-Generalization
(``Robust-Bird/train_eb.py``, ``Robust-Bird/utils/early_bird.py``). What is followed and what
differs: ``docs/methods.md`` (RobustBird).

Algorithm (pipeline B, iterative search, global, LWM), as in the authors' code:
  1. train the dense network from initialisation with the search training type (the authors'
     README: ``--stage1 sgd``, i.e. natural training, "the cheapest standard training");
     after every search interval (one epoch in the authors' code) draw the global magnitude mask
     of the conv weights at the target sparsity and keep the last ``window`` (5) draws;
  2. the early bird has emerged when the newest draw differs from **each** of the ``window - 1``
     earlier ones in at most ``tol`` (0.08, the authors' unstructured value) of the conv weights
     (distance = 1 - fraction of equal mask entries, over all conv weights, as the authors);
     the search stops there or when ``prune_epochs`` are used up;
  3. prune once: global magnitude over every prunable layer (conv and linear, the authors'
     ``prune_unstructured``), keep the current weights (no rewinding), and train the sparse
     network adversarially (the recipe's mode; the authors' ``--stage2 pgd``) with a fresh
     optimiser and schedule for ``pretrain_epochs + finetune_epochs`` **plus the search epochs the
     early stop left unused**, so Robust Bird spends the same budget as the other methods.

Budget guarantee: the test needs ``window`` draws before it can stop. When ``prune_epochs <
min_draws`` (default 10; the quick preset has one search epoch) the search draws every
``search_steps // min_draws`` iterations instead of once per epoch (every step if the search is
shorter than ``min_draws`` steps), so the search always makes ``min(min_draws, search steps)``
draws unless it stops early.

Differences (also in the doc): at sparsity >= 1 - tol / 2 (96 % for tol 0.08) two masks of the
target density can differ in at most ``2 (1 - sparsity) <= tol`` of the weights, so the
authors' test (normalised by all weights) passes by construction at the ``window``-th draw; this
is the authors' behaviour and is kept (``distance="kept"`` normalises by the kept count instead);
masks are exact global top-k (the authors threshold with ``>``, equal magnitudes may differ by a
few weights); unused search steps are added as whole epochs (rounded).
"""
from __future__ import annotations

import math
from collections import deque
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .base import PruningMethod
from .context import PruneContext
from .masks import global_masks
from .registry import register
from .tags import TaxonomyTags
from ..nn import MaskedConv2d

__all__ = ["RobustBird", "EarlyBirdTest"]


class _EarlyBird(Exception):
    pass


class EarlyBirdTest:
    """The authors' early-bird convergence test over a FIFO of the last ``window`` masks.

    Args:
        window: masks kept (the newest is compared with each of the ``window - 1`` others).
        tol: largest allowed distance.
        distance: "all" (fraction of all entries that differ, the authors') or "kept"
            (differing entries / (2 * kept entries), i.e. the fraction of the kept set that moved).
    """

    def __init__(self, window: int = 5, tol: float = 0.08, distance: str = "all"):
        if not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an int >= 2, got {window!r}")
        if not 0.0 <= tol <= 1.0:
            raise ValueError(f"tol must be in [0, 1], got {tol}")
        if distance not in ("all", "kept"):
            raise ValueError(f"distance must be 'all' or 'kept', got {distance!r}")
        self.window, self.tol, self.distance = window, tol, distance
        self.masks: deque = deque(maxlen=window)
        self.last_distances: List[float] = []

    def _dist(self, a: Tensor, b: Tensor) -> float:
        diff = float((a != b).sum())
        if self.distance == "all":
            return diff / max(1, a.numel())
        return diff / max(1.0, float(a.sum() + b.sum()))

    def put(self, mask: Tensor) -> bool:
        """Add the newest mask (flat 0/1 tensor); True when the early bird has emerged."""
        self.masks.append(mask.detach().flatten().bool().cpu())
        if len(self.masks) < self.window:
            self.last_distances = []
            return False
        new = self.masks[-1]
        self.last_distances = [self._dist(new, old) for old in list(self.masks)[:-1]]
        return max(self.last_distances) <= self.tol


@register
class RobustBird(PruningMethod):
    """Robust Bird (Chen et al., ICLR'22).

    Args:
        tol: mask-distance threshold of convergence (authors, unstructured: 0.08).
        window: masks compared (authors' ``epoch_keep``: 5).
        check_every: fixed steps between draws (None: once per epoch, or the ``min_draws``
            schedule of the module docstring for short searches).
        min_draws: fewest draws of a search that does not stop early.
        search_mode: training mode of the search (default "natural", the authors' stage 1;
            None: the recipe's mode).
        distance: "all" (authors) or "kept", see :class:`EarlyBirdTest`.
        min_keep: see :class:`PruningMethod`.
    """

    name = "robustbird"
    paper = "Chen et al., Sparsity Winning Twice, ICLR 2022 (Robust Bird)"
    # The survey / APB taxonomy file record AT(PGD) for the pruning step; the authors' README and
    # paper search with natural training ("sgd"). The tag must equal apb_sparse.taxonomy's entry
    # (tests), so it keeps the survey's value; the search actually uses ``search_mode``.
    tags = TaxonomyTags("B", ("NT", "AT(PGD)"), "IT", ("US",), None, ("G",), "LWM")
    structures = ("unstructured",)
    notes = ("draws every search_steps // 10 steps when prune_epochs < 10 (authors: per epoch); "
             "unused search epochs go to ticket training")
    code_url = "https://github.com/VITA-Group/Sparsity-Win-Robust-Generalization"

    def __init__(self, *, tol: float = 0.08, window: int = 5, check_every: Optional[int] = None,
                 min_draws: int = 10, search_mode: Optional[str] = "natural", distance: str = "all",
                 min_keep: int = 1):
        EarlyBirdTest(window, tol, distance)  # validates the three
        if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
            raise ValueError(f"check_every must be an int >= 1 or None, got {check_every!r}")
        if not isinstance(min_draws, int) or min_draws < 1:
            raise ValueError(f"min_draws must be an int >= 1, got {min_draws!r}")
        if search_mode not in (None, "natural", "pgd", "trades", "fgsm"):
            raise ValueError(f"search_mode must be None, 'natural', 'pgd', 'trades' or 'fgsm', got {search_mode!r}")
        super().__init__(min_keep=min_keep, tol=tol, window=window, check_every=check_every,
                         min_draws=min_draws, search_mode=search_mode, distance=distance)
        self.tol, self.window, self.check_every = tol, window, check_every
        self.min_draws, self.search_mode, self.distance = min_draws, search_mode, distance

    def draw_interval(self, prune_epochs: int, steps_per_epoch: int) -> int:
        """Steps between two early-bird draws of a search of ``prune_epochs`` epochs."""
        if self.check_every is not None:
            return self.check_every
        if prune_epochs >= self.min_draws:
            return steps_per_epoch
        return max(1, (prune_epochs * steps_per_epoch) // self.min_draws)

    @staticmethod
    def _eb_layers(layers: Sequence) -> list:
        convs = [l for l in layers if isinstance(l, MaskedConv2d)]
        return convs or list(layers)

    def _draw(self, layers, sparsity: float) -> List[Tensor]:
        return global_masks([l.weight.detach().abs() for l in layers], sparsity, min_keep=self.min_keep)

    def _run(self, ctx: PruneContext) -> None:
        steps_per_epoch = max(1, math.ceil(len(ctx.data.train) / ctx.recipe.batch_size))
        search_steps = ctx.recipe.prune_epochs * steps_per_epoch
        every = self.draw_interval(ctx.recipe.prune_epochs, steps_per_epoch)
        eb_layers = self._eb_layers(ctx.layers)
        test = EarlyBirdTest(self.window, self.tol, self.distance)
        state = {"n": 0, "history": []}

        def on_step(step, model):
            state["n"] += 1
            if state["n"] % every:
                return
            cur = torch.cat([m.flatten() for m in self._draw(eb_layers, ctx.sparsity)])
            stop = test.put(cur)
            state["history"].append(max(test.last_distances) if test.last_distances else None)
            if stop:
                raise _EarlyBird()

        stopped = False
        try:
            ctx.train("ticket search", ctx.recipe.prune_epochs, mode=self.search_mode, lr=ctx.recipe.lr,
                      on_step=on_step)
        except _EarlyBird:
            stopped = True
        used = state["n"] if stopped else search_steps
        # The early-bird stop leaves train() before it records the phase's steps: record the steps
        # taken (of a schedule planned for the whole search), so that budgets count the search.
        search = next(p for p in reversed(ctx.log["phases"]) if p["phase"] == "ticket search")
        if stopped:
            search.update(steps=used, schedule_steps=search_steps)
        extra_epochs = int(round((search_steps - used) / steps_per_epoch))
        ctx.log["early_bird_step"] = state["n"] if stopped else None
        ctx.log["mask_draws"] = len(state["history"])
        ctx.log["mask_distances"] = state["history"]
        ctx.log["search_steps_used"] = used
        ctx.log["extra_ticket_epochs"] = extra_epochs
        ctx.set_masks(self._draw(ctx.layers, ctx.sparsity))
        ctx.train("train ticket", ctx.recipe.pretrain_epochs + ctx.recipe.finetune_epochs + extra_epochs,
                  lr=ctx.recipe.lr)
