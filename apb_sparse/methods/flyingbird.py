"""Flying Bird: dynamic sparse adversarial training (prune-and-regrow at constant sparsity).

Paper: T. Chen, Z. Zhang, P. Wang, S. Balachandra, H. Ma, Z. Wang, Z. Wang, "Sparsity Winning
Twice: Better Robust Generalization from More Efficient Training", ICLR 2022 (Flying Bird).

Algorithm (pipeline D, AT, global, LWM):
  1. draw a random sparse mask at the target sparsity with Erdos-Renyi-Kernel layer densities
     (density of a layer proportional to ``sum(shape) / prod(shape)``, scaled so that the total is
     exact, layers that would exceed density 1 are dense);
  2. train adversarially; every ``update_every`` steps: prune the ``death_rate`` fraction of the
     active weights with the smallest magnitude (one global ranking), and regrow the same number
     of connections uniformly at random among the inactive ones (new weights start at 0); the
     death rate starts at 0.5 and decays with a cosine schedule;
  3. the sparsity is identical after every update; training ends with the last mask.

Choices: ``update_every`` defaults to ``max(1, total_steps // 80)`` (the paper: every ~900
iterations of a ~200-epoch CIFAR run, i.e. ~80 updates); updates stop after ``stop_fraction``
(0.9) of the run so the final topology gets trained; global prune / global random regrowth (the
survey lists FlyingBird as global); the adaptive "Flying Bird+" capacity schedule is not
implemented. The whole budget ``pretrain + prune + finetune`` epochs is one run at ``recipe.lr``.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import Tensor, nn

from .base import PruneContext, PruningMethod, TaxonomyTags, largest_remainder, register, topk_mask

__all__ = ["FlyingBird", "erk_keep"]


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
    lo = [min(min_keep, n) for n in sizes]
    return largest_remainder(quotas, max(total, sum(lo)), lo, sizes)


@register
class FlyingBird(PruningMethod):
    """Flying Bird (Chen et al., ICLR'22): dynamic sparse adversarial training.

    Args:
        death_rate: initial fraction of active weights pruned (and regrown) per update.
        update_every: steps between updates (None: about 80 updates per run).
        stop_fraction: fraction of the run after which the topology is frozen.
        min_keep: see :class:`PruningMethod`.
    """

    name = "flyingbird"
    paper = "Chen et al., Sparsity Winning Twice, ICLR 2022 (Flying Bird)"
    tags = TaxonomyTags("D", ("AT(PGD)",), None, ("US",), None, ("G",), "LWM")
    structures = ("unstructured",)

    def __init__(self, *, death_rate: float = 0.5, update_every=None, stop_fraction: float = 0.9,
                 min_keep: int = 1):
        if not 0.0 <= death_rate < 1.0:
            raise ValueError(f"death_rate must be in [0, 1), got {death_rate}")
        super().__init__(min_keep=min_keep, death_rate=death_rate, update_every=update_every,
                         stop_fraction=stop_fraction)
        self.death_rate, self.update_every, self.stop_fraction = death_rate, update_every, stop_fraction

    @torch.no_grad()
    def _prune_regrow(self, layers: Sequence[nn.Module], rate: float, gen: torch.Generator) -> int:
        masks = [l.weight_mask for l in layers]
        active = int(sum(int(m.sum()) for m in masks))
        n_death = int(rate * active)
        if n_death <= 0:
            return 0
        # Global prune: lowest |w| among active weights; each layer keeps >= min_keep.
        mags = []
        for l, m in zip(layers, masks):
            s = torch.where(m.bool(), l.weight.abs(), torch.full_like(l.weight, math.inf))
            keep_forced = topk_mask(torch.where(m.bool(), l.weight.abs(), torch.full_like(l.weight, -1.0)),
                                    min(self.min_keep, int(m.sum())))
            mags.append(torch.where(keep_forced.bool(), torch.full_like(s, math.inf), s).flatten())
        flat = torch.cat(mags)
        n_death = min(n_death, int(torch.isfinite(flat).sum()))
        dead = torch.sort(flat, stable=True).indices[:n_death]
        flat_mask = torch.cat([m.flatten() for m in masks]).clone()
        was_inactive = flat_mask == 0
        flat_mask[dead] = 0
        # Global random regrowth among the positions inactive before this update.
        cand = torch.nonzero(was_inactive).flatten()
        pick = cand[torch.randperm(cand.numel(), generator=gen)[:n_death].to(cand.device)]
        flat_mask[pick] = 1
        start = 0
        for l, m in zip(layers, masks):
            n = m.numel()
            l.set_mask(flat_mask[start:start + n].view_as(m))
            start += n
        return n_death

    def _run(self, ctx: PruneContext) -> None:
        layers = ctx.layers
        gen = torch.Generator().manual_seed(ctx.recipe.seed + 7)
        init = [topk_mask(torch.rand(l.weight.shape, generator=gen).to(ctx.device), k)
                for l, k in zip(layers, erk_keep(layers, ctx.sparsity, self.min_keep))]
        ctx.set_masks(init)
        total_epochs = ctx.recipe.total_epochs
        steps_per_epoch = max(1, math.ceil(len(ctx.data.train) / ctx.recipe.batch_size))
        total_steps = max(1, total_epochs * steps_per_epoch)
        every = self.update_every or max(1, total_steps // 80)
        stop = int(self.stop_fraction * total_steps)
        history = []
        state = {"n": 0}

        def on_step(step, model):
            state["n"] += 1
            t = state["n"]
            if t % every or t > stop:
                return
            rate = self.death_rate * 0.5 * (1 + math.cos(math.pi * t / total_steps))
            moved = self._prune_regrow(layers, rate, gen)
            kept = sum(int(l.weight_mask.sum()) for l in layers)
            history.append({"step": t, "death_rate": rate, "moved": moved, "kept": kept})

        ctx.train("dynamic sparse AT", total_epochs, lr=ctx.recipe.lr, on_step=on_step)
        ctx.log["updates"] = history
