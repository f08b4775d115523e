"""Flying Bird: dynamic sparse adversarial training (prune-and-regrow at constant sparsity).

Paper: T. Chen, Z. Zhang, P. Wang, S. Balachandra, H. Ma, Z. Wang, Z. Wang, "Sparsity Winning
Twice: Better Robust Generalization from More Efficient Training", ICLR 2022 (Flying Bird).
Authors' code: https://github.com/VITA-Group/Sparsity-Win-Robust-Generalization (``main_adv.py``,
``sparselearning/core.py``). What is followed and what differs: ``docs/methods.md`` (FlyingBird).

Algorithm (pipeline D, AT), as in the authors' ``--fb --dynamic_fre`` run:
  1. draw a random sparse mask whose per-layer densities follow the authors' default allocation,
     IGQ ("ideal gas quotas": layer density ``1 / (f * n_l + 1)`` with ``f`` solved so the total
     is the target; ``init="erk"`` for Erdos-Renyi-Kernel, ``"uniform"`` for one density), with
     exact per-layer counts (largest-remainder rounding) and positions uniformly at random;
  2. train adversarially with the mask; every ``update_every`` steps, **in every layer that is not
     dense**: prune the ``ceil(d_t * active_l)`` active weights of smallest magnitude and regrow as
     many connections uniformly at random among that layer's inactive positions (positions just
     pruned included, as in the authors' code; new connections start at 0, a pruned-and-regrown
     one keeps its value). Each layer's count therefore stays at its initial allocation;
  3. the death rate ``d_t`` decays with the authors' per-step cosine from ``death_rate`` (0.5) to
     0.005 over the whole run, and updates continue until the end of training (the authors never
     freeze the topology); the update interval grows by 4/3 in the second half of the run (the
     authors' ``--dynamic_fre``: every 900, then every 1200 iterations).

Budget guarantee: the authors' intervals (900 / 1200 of the 78,200 iterations of their 200-epoch
CIFAR-10 run) are scaled to the length ``T`` of this run, but never below ``min_interval`` steps
(so regrown weights get trained before they are judged), and shortened if needed so that at
least ``min_updates`` (default 4) updates happen whenever ``T >= min_updates``. The whole budget
``pretrain + prune + finetune`` epochs is one run at ``recipe.lr``.

Differences (also in the doc): the regrowth count is exact (the authors draw Bernoulli with the
expected count, so their layer counts fluctuate slightly); the learning-rate schedule is the
recipe's (the authors: step decay at epochs 100 and 150 of 200); the momentum buffer of pruned
weights is not zeroed (their gradient is zero, so it decays); the adaptive "Flying Bird+"
capacity schedule is not implemented. The survey records FlyingBird's locality as global (the
tag keeps the survey's value): only the initial allocation is computed over the whole network;
every update is per layer.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from .base import PruningMethod
from .context import PruneContext
from .masks import largest_remainder, topk_mask
from .registry import register
from .tags import TaxonomyTags

__all__ = ["FlyingBird", "erk_keep", "igq_keep", "flyingbird_update_steps"]

# The authors' CIFAR-10 run: 200 epochs of 391 iterations, updates every 900 / 1200 iterations.
_REF_STEPS = 200 * 391
_REF_FIRST, _REF_SECOND = 900, 1200


def _exact_counts(quotas: Sequence[float], sizes: Sequence[int], sparsity: float, min_keep: int) -> List[int]:
    total = int(round((1.0 - sparsity) * sum(sizes)))
    lo = [min(min_keep, n) for n in sizes]
    return largest_remainder(list(quotas), max(total, sum(lo)), lo, list(sizes))


def erk_keep(layers: Sequence[nn.Module], sparsity: float, min_keep: int = 1) -> List[int]:
    """Exact kept-weight counts per layer from Erdos-Renyi-Kernel densities."""
    sizes = [l.weight.numel() for l in layers]
    raw = [sum(l.weight.shape) / l.weight.numel() for l in layers]
    total = int(round((1.0 - sparsity) * sum(sizes)))
    dense = set()
    while True:
        budget = total - sum(sizes[i] for i in dense)
        denom = sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        eps = budget / denom if denom > 0 else 0.0
        over = [i for i in range(len(sizes)) if i not in dense and eps * raw[i] > 1.0]
        if not over:
            break
        dense.update(over)
    quotas = [float(sizes[i]) if i in dense else eps * raw[i] * sizes[i] for i in range(len(sizes))]
    return _exact_counts(quotas, sizes, sparsity, min_keep)


def igq_keep(layers: Sequence[nn.Module], sparsity: float, min_keep: int = 1) -> List[int]:
    """Exact kept-weight counts per layer from IGQ ("ideal gas quotas") densities.

    Layer ``l`` with ``n_l`` weights keeps ``n_l / (f * n_l + 1)``, with the "force" ``f >= 0``
    found by bisection so that the total is ``(1 - sparsity) * N`` (the authors' default
    ``--sparse_init igq``). Small layers stay nearly dense, large ones get sparse.
    """
    sizes = [l.weight.numel() for l in layers]
    target = (1.0 - sparsity) * sum(sizes)

    def kept(f: float) -> float:
        return sum(n / (f * n + 1.0) for n in sizes)

    if target >= kept(0.0) - 1e-9:
        quotas = [float(n) for n in sizes]
    else:
        lo, hi = 0.0, 1.0
        while kept(hi) > target:
            hi *= 2.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if kept(mid) > target:
                lo = mid
            else:
                hi = mid
        f = 0.5 * (lo + hi)
        quotas = [n / (f * n + 1.0) for n in sizes]
    return _exact_counts(quotas, sizes, sparsity, min_keep)


_INITS = {"igq": igq_keep, "erk": erk_keep}


def flyingbird_update_steps(total_steps: int, *, update_every: Optional[int] = None,
                            min_interval: int = 4, min_updates: int = 4) -> List[int]:
    """The 1-based step numbers after which FlyingBird updates the topology.

    ``update_every=None``: the authors' intervals scaled to ``total_steps`` (first half, second
    half in the ratio 900 : 1200), at least ``min_interval`` steps, shortened so that there are at
    least ``min(min_updates, total_steps)`` updates. An int: a fixed interval.
    """
    T = int(total_steps)
    if T <= 0:
        return []
    if update_every is not None:
        return list(range(update_every, T + 1, update_every))
    first = max(min_interval, int(round(T * _REF_FIRST / _REF_STEPS)))
    second = max(min_interval, int(round(T * _REF_SECOND / _REF_STEPS)))

    def schedule(a: int, b: int) -> List[int]:
        out, t, half = [], 0, T / 2.0
        while True:
            t += a if t < half else b
            if t > T:
                return out
            out.append(t)

    steps = schedule(first, second)
    need = min(min_updates, T)
    if len(steps) < need:
        every = max(1, T // need)
        steps = schedule(every, every)
    return steps


@register
class FlyingBird(PruningMethod):
    """Flying Bird (Chen et al., ICLR'22): dynamic sparse adversarial training.

    Args:
        death_rate: initial fraction of each layer's active weights pruned (and regrown) per
            update (authors: 0.5).
        death_rate_min: floor of the cosine decay (authors: 0.005).
        init: initial per-layer allocation: "igq" (authors' default), "erk" or "uniform".
        update_every: fixed steps between updates (None: the authors' schedule scaled to the run,
            see :func:`flyingbird_update_steps`).
        min_interval, min_updates: bounds of the derived schedule.
        stop_fraction: fraction of the run after which the topology is frozen (1.0: never, as
            the authors).
        min_keep: see :class:`PruningMethod`.
    """

    name = "flyingbird"
    paper = "Chen et al., Sparsity Winning Twice, ICLR 2022 (Flying Bird)"
    tags = TaxonomyTags("D", ("AT(PGD)",), None, ("US",), None, ("G",), "LWM")
    structures = ("unstructured",)
    notes = ("update interval scaled to the run (>= 4 updates); exact regrowth counts "
             "(authors: Bernoulli); recipe LR schedule")
    code_url = "https://github.com/VITA-Group/Sparsity-Win-Robust-Generalization"

    def __init__(self, *, death_rate: float = 0.5, death_rate_min: float = 0.005, init: str = "igq",
                 update_every: Optional[int] = None, min_interval: int = 4, min_updates: int = 4,
                 stop_fraction: float = 1.0, min_keep: int = 1):
        if not 0.0 <= death_rate < 1.0:
            raise ValueError(f"death_rate must be in [0, 1), got {death_rate}")
        if not 0.0 <= death_rate_min <= death_rate:
            raise ValueError(f"death_rate_min must be in [0, death_rate], got {death_rate_min}")
        if init not in ("igq", "erk", "uniform"):
            raise ValueError(f"init must be 'igq', 'erk' or 'uniform', got {init!r}")
        if update_every is not None and (not isinstance(update_every, int) or update_every < 1):
            raise ValueError(f"update_every must be an int >= 1 or None, got {update_every!r}")
        for name, v in (("min_interval", min_interval), ("min_updates", min_updates)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not 0.0 < stop_fraction <= 1.0:
            raise ValueError(f"stop_fraction must be in (0, 1], got {stop_fraction}")
        super().__init__(min_keep=min_keep, death_rate=death_rate, death_rate_min=death_rate_min,
                         init=init, update_every=update_every, min_interval=min_interval,
                         min_updates=min_updates, stop_fraction=stop_fraction)
        self.death_rate, self.death_rate_min, self.init = death_rate, death_rate_min, init
        self.update_every, self.min_interval, self.min_updates = update_every, min_interval, min_updates
        self.stop_fraction = stop_fraction

    def initial_keep(self, layers: Sequence[nn.Module], sparsity: float) -> List[int]:
        """Per-layer kept counts of the initial mask."""
        if self.init == "uniform":
            sizes = [l.weight.numel() for l in layers]
            return _exact_counts([(1.0 - sparsity) * n for n in sizes], sizes, sparsity, self.min_keep)
        return _INITS[self.init](layers, sparsity, self.min_keep)

    def death_rate_at(self, step: int, total_steps: int) -> float:
        """The authors' per-step cosine decay of the death rate (``CosineAnnealingLR``)."""
        c = 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
        return self.death_rate_min + (self.death_rate - self.death_rate_min) * c

    @torch.no_grad()
    def _prune_regrow(self, layers: Sequence[nn.Module], rate: float, gen: torch.Generator) -> List[int]:
        moved = []
        for l in layers:
            m = l.weight_mask
            n = m.numel()
            active = int(m.sum())
            # Dense layers are left alone (authors' magnitude_death returns the mask unchanged).
            n_death = min(int(math.ceil(rate * active)), max(0, active - min(self.min_keep, n)))
            if active == n or n_death <= 0:
                moved.append(0)
                continue
            flat = m.flatten().clone()
            mag = torch.where(flat.bool(), l.weight.detach().abs().flatten(),
                              torch.full_like(flat, math.inf))
            dead = torch.sort(mag, stable=True).indices[:n_death]
            flat[dead] = 0
            # Regrow exactly as many among this layer's zeros (the just-pruned ones included).
            cand = torch.nonzero(flat == 0).flatten()
            pick = torch.randperm(cand.numel(), generator=gen)[:n_death].to(cand.device)
            flat[cand[pick]] = 1
            l.set_mask(flat.view_as(m))
            moved.append(n_death)
        return moved

    def _run(self, ctx: PruneContext) -> None:
        layers = ctx.layers
        gen = torch.Generator().manual_seed(ctx.recipe.seed + 7)
        keep0 = self.initial_keep(layers, ctx.sparsity)
        init = [topk_mask(torch.rand(l.weight.shape, generator=gen).to(ctx.device), k)
                for l, k in zip(layers, keep0)]
        ctx.set_masks(init)
        total_epochs = ctx.recipe.total_epochs
        steps_per_epoch = max(1, math.ceil(len(ctx.data.train) / ctx.recipe.batch_size))
        total_steps = total_epochs * steps_per_epoch
        update_at = set(flyingbird_update_steps(total_steps, update_every=self.update_every,
                                                min_interval=self.min_interval,
                                                min_updates=self.min_updates))
        stop = int(math.floor(self.stop_fraction * total_steps))
        history = []
        state = {"n": 0}

        def on_step(step, model):
            state["n"] += 1
            t = state["n"]
            if t not in update_at or t > stop:
                return
            rate = self.death_rate_at(t, total_steps)
            moved = self._prune_regrow(layers, rate, gen)
            layer_kept = [int(l.weight_mask.sum()) for l in layers]
            history.append({"step": t, "death_rate": rate, "moved": sum(moved),
                            "kept": sum(layer_kept), "layer_kept": layer_kept})

        ctx.train("dynamic sparse AT", total_epochs, lr=ctx.recipe.lr, on_step=on_step)
        ctx.log["initial_layer_kept"] = keep0
        ctx.log["total_steps"] = total_steps
        ctx.log["updates"] = history
