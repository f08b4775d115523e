"""RADMM: adversarial training under an ADMM sparsity constraint, hard prune, adversarial retraining.

Paper: S. Ye, K. Xu, S. Liu, H. Cheng, J.-H. Lambrechts, H. Zhang, A. Zhou, K. Ma, Y. Wang, X. Lin,
"Adversarial Robustness vs. Model Compression, or Both?", ICCV 2019.

Algorithm (pipeline A, AT/AT, one-shot, local, solver-based LWM):
  1. adversarially pretrain (skipped for a ``pretrained`` model);
  2. ADMM phase (``prune_epochs``): minimise ``adv_loss(W) + rho/2 * sum_l ||W_l - Z_l + U_l||^2``
     by SGD on W, and every ``interval`` steps update ``Z_l = Proj_S(W_l + U_l)`` (Euclidean
     projection onto the layer's sparsity set: keep its top-k magnitudes; structured: its top-k
     filters by L2 norm) and ``U_l += W_l - Z_l``; rho grows by ``rho_growth`` at every update
     (progressive "multi-rho" ADMM);
  3. hard prune: the mask is ``Proj_S(W)`` per layer; retrain the masked network adversarially
     for ``finetune_epochs`` at ``recipe.finetune_lr``.

Choices: the per-layer budget is the uniform target sparsity (the paper sets per-layer ratios by
hand; uniform is the documented default of its code for a single ratio), with exact
largest-remainder rounding. ADMM variable updates are spread evenly over the phase
(``n_updates``, default 10, but at least 10 SGD steps apart so each W-subproblem is roughly
solved; the paper updates once per epoch over tens of epochs). rho is scaled
to the budget: it starts at ``1 / (lr * phase_steps)`` (about 1e-2 for 20 CIFAR epochs at lr
0.01, the paper's range) so that W can actually reach the sparse set in the available steps,
grows x1.3 per update ("multi-rho"), and is capped at ``0.1 / lr`` for SGD stability. The ADMM
phase runs at ``recipe.finetune_lr`` (the paper starts ADMM from a trained model with a small
rate).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import (PruneContext, PruningMethod, TaxonomyTags, expand_filter_mask, largest_remainder,
                   register, topk_mask)

__all__ = ["RADMM", "ADMMState"]


class ADMMState:
    """Per-layer ADMM variables (Z, U) for a top-k sparsity constraint.

    Args:
        layers: masked layers whose weights are constrained.
        keep: kept units per layer (weights, or filters when ``structured``).
        structured: project onto whole filters (by L2 norm) instead of single weights.
        rho, rho_growth, rho_max: penalty weight (None: set by :func:`run_admm` from the
            budget), its growth factor per update, its cap.
    """

    def __init__(self, layers: Sequence[nn.Module], keep: Sequence[int], *, structured: bool,
                 rho: Optional[float], rho_growth: float = 1.3, rho_max: float = math.inf):
        self.layers = list(layers)
        self.keep = list(keep)
        self.structured = structured
        self.rho, self.rho_growth, self.rho_max = rho, rho_growth, rho_max
        with torch.no_grad():
            self.U = [torch.zeros_like(l.weight) for l in self.layers]
            self.Z = [self.project(l, l.weight.detach(), k) for l, k in zip(self.layers, self.keep)]
        self.updates = 0

    def project(self, layer: nn.Module, w: Tensor, k: int) -> Tensor:
        return w * self.mask_of(layer, w, k)

    def mask_of(self, layer: nn.Module, w: Tensor, k: int) -> Tensor:
        if self.structured:
            return expand_filter_mask(layer, topk_mask(w.flatten(1).norm(dim=1), k))
        return topk_mask(w.abs(), k).to(w.dtype)

    @torch.no_grad()
    def update(self) -> None:
        for i, (l, k) in enumerate(zip(self.layers, self.keep)):
            w = l.weight.detach()
            self.Z[i] = self.project(l, w + self.U[i], k)
            self.U[i] += w - self.Z[i]
        self.rho = min(self.rho * self.rho_growth, self.rho_max)
        self.updates += 1

    def penalty(self) -> Tensor:
        return 0.5 * self.rho * sum(((l.weight - z + u) ** 2).sum()
                                    for l, z, u in zip(self.layers, self.Z, self.U))

    def residual(self) -> float:
        """Relative distance ``||W - Z|| / ||W||`` (how close W is to the sparse set)."""
        with torch.no_grad():
            num = sum(float(((l.weight - z) ** 2).sum()) for l, z in zip(self.layers, self.Z))
            den = sum(float((l.weight ** 2).sum()) for l in self.layers)
        return math.sqrt(num / max(den, 1e-12))

    def final_masks(self) -> List[Tensor]:
        return [self.mask_of(l, l.weight.detach(), k) for l, k in zip(self.layers, self.keep)]


def local_unit_keep(ctx: PruneContext, min_keep: int) -> List[int]:
    """Exact per-layer kept units (weights, or filters for the structured variant)."""
    if ctx.structured:
        counts = [l.weight.shape[0] for l in ctx.layers]
        return [min(max(int(round((1.0 - ctx.sparsity) * c)), min(min_keep, c)), c) for c in counts]
    sizes = [l.weight.numel() for l in ctx.layers]
    lo = [min(min_keep, n) for n in sizes]
    total = max(int(round((1.0 - ctx.sparsity) * sum(sizes))), sum(lo))
    return largest_remainder([(1.0 - ctx.sparsity) * n for n in sizes], total, lo, sizes)


MIN_INTERVAL = 10


def run_admm(ctx: PruneContext, admm: ADMMState, n_updates: int, *, phase: str, lr: float,
             mode: Optional[str] = None, loss_fn: Optional[Callable] = None) -> None:
    """Train ``prune_epochs`` with the ADMM penalty, updating Z/U ``n_updates`` times."""
    epochs = ctx.recipe.prune_epochs
    steps_per_epoch = max(1, math.ceil(len(ctx.data.train) / ctx.recipe.batch_size))
    total_steps = max(1, epochs * steps_per_epoch)
    # Each W-subproblem needs some SGD steps before the dual update, else ADMM oscillates: at
    # least MIN_INTERVAL steps between Z/U updates (short budgets get fewer updates).
    interval = max(MIN_INTERVAL, total_steps // max(1, n_updates))
    # The penalty pulls W to Z by a factor ~ lr * rho per step; W only reaches the sparse set if
    # total_steps * lr * rho is of order 1, and SGD with momentum 0.9 stays stable while
    # lr * rho < 0.2. So an unset rho is scaled to the budget, and rho is always capped.
    if admm.rho is None:
        admm.rho = 1.0 / (lr * total_steps)
    admm.rho_max = min(admm.rho_max, 0.1 / lr)
    admm.rho = min(admm.rho, admm.rho_max)
    ctx.log["admm_rho_start"] = admm.rho
    count = {"n": 0}

    def on_step(step, model):
        count["n"] += 1
        if count["n"] % interval == 0:
            admm.update()

    ctx.train(phase, epochs, lr=lr, mode=mode, loss_fn=loss_fn,
              extra_loss=lambda model, x, y: admm.penalty(), on_step=on_step)
    ctx.log["admm_updates"] = admm.updates
    ctx.log["admm_residual"] = admm.residual()
    ctx.log["admm_rho_end"] = admm.rho


@register
class RADMM(PruningMethod):
    """Robust ADMM pruning (Ye et al., ICCV'19).

    Args:
        rho: initial ADMM penalty (None: ``1 / (lr * steps of the ADMM phase)``, see module doc).
        rho_growth: factor applied to rho at every Z/U update.
        n_updates: Z/U updates over the ADMM phase.
        admm_lr: learning rate of the ADMM phase (None: ``recipe.finetune_lr``).
        min_keep: see :class:`PruningMethod`.
    """

    name = "radmm"
    paper = "Ye et al., Adversarial Robustness vs. Model Compression, or Both?, ICCV 2019"
    tags = TaxonomyTags("A", ("AT(PGD)", "AT(PGD)"), "1S", ("US", "S"), "filters", ("L",), "SOLWM")
    structures = ("unstructured", "filter")

    def __init__(self, *, rho=None, rho_growth: float = 1.3, n_updates: int = 10,
                 admm_lr=None, min_keep: int = 1):
        if rho is not None and rho <= 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        super().__init__(min_keep=min_keep, rho=rho, rho_growth=rho_growth, n_updates=n_updates,
                         admm_lr=admm_lr)
        self.rho, self.rho_growth, self.n_updates, self.admm_lr = rho, rho_growth, n_updates, admm_lr

    def _run(self, ctx: PruneContext) -> None:
        ctx.pretrain()
        admm = ADMMState(ctx.layers, local_unit_keep(ctx, self.min_keep), structured=ctx.structured,
                         rho=self.rho, rho_growth=self.rho_growth)
        run_admm(ctx, admm, self.n_updates, phase="prune (ADMM)",
                 lr=self.admm_lr if self.admm_lr is not None else ctx.recipe.finetune_lr)
        ctx.set_masks(admm.final_masks())
        ctx.finetune()
