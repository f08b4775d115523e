"""RADMM: adversarial training under an ADMM sparsity constraint, hard prune, adversarial retraining.

Paper: S. Ye, K. Xu, S. Liu, H. Cheng, J.-H. Lambrechts, H. Zhang, A. Zhou, K. Ma, Y. Wang, X. Lin,
"Adversarial Robustness vs. Model Compression, or Both?", ICCV 2019. Authors' code:
https://github.com/yeshaokai/Robustness-Aware-Pruning-ADMM. What follows the authors and what does
not, with every scale-down: docs/methods.md (section RADMM).

Algorithm (pipeline A, AT/AT, one-shot, local, solver-based LWM):
  1. adversarially pretrain (skipped for a ``pretrained`` model);
  2. ADMM phase (``prune_epochs``): minimise ``adv_loss(W) + rho/2 * sum_l ||W_l - Z_l + U_l||^2``
     by SGD on W; Z starts as the projection of W, and at the end of every block of ``interval``
     steps but the last ``Z_l = Proj_S(W_l + U_l)`` (Euclidean projection onto the layer's sparsity
     set: keep its top-k magnitudes; structured: its top-k filters by L2 norm) and
     ``U_l += W_l - Z_l``; rho grows by ``rho_growth`` (x1.3) at every update (the authors'
     "multi-rho");
  3. hard prune: the mask is ``Proj_S(W)`` per layer; retrain the masked network adversarially
     for ``finetune_epochs`` at ``recipe.finetune_lr``.

Minimum algorithmic steps (guaranteed in every preset): ``min_updates`` = 4 Z/U updates, each
W-subproblem at least ``min_interval`` = 10 SGD steps, i.e. an ADMM phase of at least 50 optimiser
steps. The authors run 9 updates (200 ADMM epochs, ``admm_epoch`` 20) with W-subproblems of 20
epochs; ``n_updates`` defaults to 9 and is reduced only when the phase has fewer than 100 steps.
A W-subproblem needs ~10 SGD steps: the penalty pulls W towards ``Z - U`` by ``lr * rho`` per step,
``lr * rho`` must stay below ~0.1 for SGD with momentum, and with fewer steps the dual variable
accumulates faster than W follows and the iteration drifts away from the sparse set (measured:
updates every 2 steps on digits left ``||W - Z|| / ||W|| = 1.2``). A phase too short for the
minimum is lengthened (logged as ``admm_epochs`` > ``admm_epochs_requested``): the quick preset
(digits, 12 steps per epoch, ``prune_epochs=1``) runs 5 ADMM epochs with 5 updates. The epochs
added are taken out of the masked retraining (``admm_finetune_epochs``; quick preset: 5 - 4 = 1
retraining epoch), so the method's total budget stays the recipe's, the same as every other
method's.

Differences from the authors' code, and why:
  * every conv *and* the classifier are pruned (our common rule for all methods, so sparsities
    are comparable); the authors' configs list conv layers only;
  * uniform per-layer sparsity with exact largest-remainder rounding (the authors take per-layer
    ratios from a hand-written config; uniform is what their config does for a single ratio);
  * rho is scaled to the budget when not given: it starts at ``1 / (lr * phase_steps)`` (about
    1e-2 for 20 CIFAR epochs at lr 0.01; the authors start at 1e-3 over 200 epochs) so that W can
    reach the sparse set in the available steps, and is capped at ``0.1 / lr`` for SGD stability;
  * the learning rate follows the recipe's scheduler over the phase; the authors reset it at every
    Z/U update and decay it x0.1 after each third of a block (``train.train`` has no such
    periodic schedule);
  * the ADMM phase runs at ``recipe.finetune_lr`` (the authors' 0.01), retraining likewise.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .base import (PruneContext, PruningMethod, TaxonomyTags, expand_filter_mask, largest_remainder,
                   register, topk_mask)

__all__ = ["RADMM", "ADMMState", "admm_schedule", "admm_phase_epochs", "admm_finetune_epochs", "run_admm"]


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


def admm_schedule(total_steps: int, n_updates: int, min_updates: int,
                  min_interval: int) -> Tuple[int, int]:
    """Z/U update plan of an ADMM phase: ``(updates, interval)``.

    The phase is split into ``updates + 1`` W-subproblems of ``interval`` SGD steps each (the
    authors' layout: Z initialised at the start, updated at the end of every block but the last).
    ``updates`` is ``n_updates`` when the phase is long enough, else as many as fit with at least
    ``min_interval`` steps per block. Returns ``(0, 0)`` when even ``min_updates`` do not fit (the
    caller then lengthens the phase, see :func:`admm_phase_epochs`).
    """
    if total_steps <= 0:
        return 0, 0
    fit = total_steps // max(1, min_interval) - 1
    updates = min(n_updates, fit)
    if updates < min_updates:
        return 0, 0
    return updates, total_steps // (updates + 1)


def admm_phase_epochs(epochs: int, steps_per_epoch: int, min_updates: int, min_interval: int) -> int:
    """Epochs of the ADMM phase: ``epochs``, lengthened until ``min_updates`` updates fit.

    ``epochs == 0`` stays 0 (the caller asked for no pruning phase: the mask is then the plain
    magnitude projection, as used by the no-training exactness tests).
    """
    if epochs <= 0:
        return 0
    need = (min_updates + 1) * min_interval
    return max(epochs, math.ceil(need / max(1, steps_per_epoch)))


def run_admm(ctx: PruneContext, admm: ADMMState, n_updates: int, *, phase: str, lr: float,
             mode: Optional[str] = None, loss_fn: Optional[Callable] = None,
             min_updates: int = 4, min_interval: int = 10) -> None:
    """Train the ADMM phase with the penalty, updating Z/U ``n_updates`` times (at least ``min_updates``).

    The phase is ``recipe.prune_epochs`` long; a budget too short for ``min_updates`` updates of
    ``min_interval`` SGD steps each is lengthened (logged as ``admm_epochs`` >
    ``admm_epochs_requested``), so the method always runs the algorithmic steps that make it
    ADMM. Updates are counted per optimiser step, so the count does not depend on the epoch
    length.
    """
    requested = ctx.recipe.prune_epochs
    spe = ctx.steps_per_epoch
    epochs = admm_phase_epochs(requested, spe, min_updates, min_interval)
    total_steps = epochs * spe
    updates, interval = admm_schedule(total_steps, n_updates, min_updates, min_interval)
    # The penalty pulls W to Z by a factor ~ lr * rho per step; W only reaches the sparse set if
    # total_steps * lr * rho is of order 1, and SGD with momentum 0.9 stays stable while
    # lr * rho < 0.2. So an unset rho is scaled to the budget, and rho is always capped.
    if admm.rho is None:
        admm.rho = 1.0 / (lr * max(1, total_steps))
    admm.rho_max = min(admm.rho_max, 0.1 / lr)
    admm.rho = min(admm.rho, admm.rho_max)
    ctx.log.update(admm_rho_start=admm.rho, admm_epochs_requested=requested, admm_epochs=epochs,
                   admm_planned_updates=updates, admm_interval=interval,
                   admm_borrowed_epochs=max(0, epochs - requested))
    count = {"n": 0}

    def on_step(step, model):
        count["n"] += 1
        if interval and count["n"] % interval == 0 and admm.updates < updates:
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
        n_updates: Z/U updates over the ADMM phase (the authors' 9).
        min_updates: Z/U updates guaranteed even on short budgets (the phase is lengthened).
        min_interval: SGD steps at least between two Z/U updates.
        admm_lr: learning rate of the ADMM phase (None: ``recipe.finetune_lr``).
        min_keep: see :class:`PruningMethod`.
    """

    name = "radmm"
    paper = "Ye et al., Adversarial Robustness vs. Model Compression, or Both?, ICCV 2019"
    code_url = "https://github.com/yeshaokai/Robustness-Aware-Pruning-ADMM"
    notes = ("classifier pruned too (authors: convs only); rho scaled to the budget; recipe LR "
             "schedule instead of the per-update LR reset")
    tags = TaxonomyTags("A", ("AT(PGD)", "AT(PGD)"), "1S", ("US", "S"), "filters", ("L",), "SOLWM")
    structures = ("unstructured", "filter")

    def __init__(self, *, rho=None, rho_growth: float = 1.3, n_updates: int = 9,
                 min_updates: int = 4, min_interval: int = 10, admm_lr=None, min_keep: int = 1):
        if rho is not None and rho <= 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        _check_schedule(n_updates, min_updates, min_interval)
        super().__init__(min_keep=min_keep, rho=rho, rho_growth=rho_growth, n_updates=n_updates,
                         min_updates=min_updates, min_interval=min_interval, admm_lr=admm_lr)
        self.rho, self.rho_growth, self.admm_lr = rho, rho_growth, admm_lr
        self.n_updates, self.min_updates, self.min_interval = n_updates, min_updates, min_interval

    def _run(self, ctx: PruneContext) -> None:
        ctx.pretrain()
        admm = ADMMState(ctx.layers, local_unit_keep(ctx, self.min_keep), structured=ctx.structured,
                         rho=self.rho, rho_growth=self.rho_growth)
        run_admm(ctx, admm, self.n_updates, phase="prune (ADMM)",
                 lr=self.admm_lr if self.admm_lr is not None else ctx.recipe.finetune_lr,
                 min_updates=self.min_updates, min_interval=self.min_interval)
        ctx.set_masks(admm.final_masks())
        ctx.finetune(admm_finetune_epochs(ctx))


def admm_finetune_epochs(ctx: PruneContext) -> int:
    """Finetuning epochs after an ADMM phase: the recipe's, less the epochs the ADMM phase was
    lengthened by (``admm_borrowed_epochs``), so that the method's total budget stays the
    recipe's, as for every other method (never below 1 epoch when the recipe has any)."""
    e = ctx.recipe.finetune_epochs
    borrowed = int(ctx.log.get("admm_borrowed_epochs", 0))
    out = max(min(1, e), e - borrowed)
    ctx.log["finetune_epochs_after_admm"] = out
    return out


def _check_schedule(n_updates, min_updates, min_interval) -> None:
    for name, v, lo in (("n_updates", n_updates, 1), ("min_updates", min_updates, 1),
                        ("min_interval", min_interval, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if min_updates > n_updates:
        raise ValueError(f"min_updates ({min_updates}) must be <= n_updates ({n_updates})")
