"""HARP: holistic adversarially robust pruning — learn per-layer rates and per-weight scores.

Paper: Q. Zhao, C. Wressnegger, "Holistic Adversarially Robust Pruning", ICLR 2023.

Algorithm (pipeline A, AT/AT, one-shot, global budget, least-importance-score):
  1. adversarially pretrain (skipped for a ``pretrained`` model);
  2. freeze the weights; learn (a) a score per weight (per output filter for the structured
     variant) and (b) a rate per layer: the layer keeps the top ``a_l = k_min + (1 - k_min) *
     sigmoid(r_l)`` fraction of its scores, with ``k_min = alpha * (1 - sparsity)`` (HARP's rate
     activation). The hard top-k passes its gradient straight through to the scores, and the
     rate receives the sum of the mask gradients (HARP's straight-through rate estimate). The loss
     is ``robust_loss + gamma(t) * relu(kept(a) / target - 1)`` where ``kept(a) = sum_l a_l n_l``
     is differentiable in the rates; gamma follows HARP's step-wise incremental schedule: 0 for
     the first stage (robustness first), then growing in ``n_stages`` equal steps to
     ``gamma_max`` and held there (both objectives);
  3. the learned rates set each layer's share of the exact global budget (largest-remainder
     rounding of ``a_l n_l`` rescaled to ``(1 - sparsity) N``), the mask is the per-layer top-k of
     the scores, and the kept weights are finetuned adversarially (``finetune_epochs`` at
     ``recipe.finetune_lr``).

Choices (paper details unknown or scaled to the budget): scores start from HYDRA's scaled
magnitude init (HARP starts from a HYDRA-style score phase); rates start at the target density
in every layer (uniform allocation) instead of HARP's near-dense start, so that a few score
epochs suffice to reach the budget; ``alpha = 0.1``, ``gamma_max = 10``, 4 stages; rates and
scores share the optimiser (SGD at ``recipe.lr``), the rate gradient is scaled by
``rate_grad_scale`` (default 1 / (number of weights in the layer), so the rate moves by a mean
rather than a sum of mask gradients, which is stable at lr 0.1). Structured variant
(``structure="filter"``): one score per output filter of every conv layer, rates per conv
layer, the budget counted in weights.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (PruneContext, PruningMethod, TaxonomyTags, expand_filter_mask, largest_remainder,
                   register, topk_mask)
from .hydra import freeze_model, hydra_init

__all__ = ["HARP"]


class _RateTopK(torch.autograd.Function):
    """Returns a precomputed top-k mask; gradient straight to the scores, summed to the rate."""

    @staticmethod
    def forward(ctx, scores: Tensor, rate: Tensor, mask: Tensor, grad_scale: float):
        ctx.grad_scale = grad_scale
        return mask.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, (grad.sum() * ctx.grad_scale).reshape(()), None, None


def _rate_mask_fn(s: Tensor, rate_fn, min_keep: int, grad_scale: float, expand_to=None):
    """``mask_fn`` of one layer: top-(rate * n) of |s|, sorted again only when s or k changed."""
    cache = {}
    n = s.numel()

    def mask_fn(layer):
        a = rate_fn()
        k = max(min(int(round(float(a.detach()) * n)), n), min(min_keep, n))
        key = (s._version, k)
        if cache.get("key") != key:
            cache["mask"] = topk_mask(s.detach().abs(), k).to(s.dtype)
            cache["key"] = key
        m = _RateTopK.apply(s.abs(), a, cache["mask"], grad_scale)
        return expand_filter_mask(layer, m) if expand_to else m
    return mask_fn


@register
class HARP(PruningMethod):
    """HARP (Zhao & Wressnegger, ICLR'23): learned per-layer rates + scores under a global budget.

    Args:
        alpha: ``k_min = alpha * (1 - sparsity)``, the smallest density a layer may reach.
        gamma_max: final weight of the compression regulariser.
        n_stages: steps of the incremental gamma schedule (stage 0 has gamma 0).
        rate_grad_scale: multiplier of the rate gradient; None = 1 / (units in the layer).
        score_lr: learning rate of scores and rates (None: ``recipe.lr``).
        min_keep: see :class:`PruningMethod`.
    """

    name = "harp"
    paper = "Zhao & Wressnegger, Holistic Adversarially Robust Pruning, ICLR 2023"
    tags = TaxonomyTags("A", ("AT(TRADES)", "AT(TRADES)"), "1S", ("US", "S"), "channels", ("G",), "LIS")
    structures = ("unstructured", "filter")

    def __init__(self, *, alpha: float = 0.1, gamma_max: float = 10.0, n_stages: int = 4,
                 rate_grad_scale=None, score_lr=None, min_keep: int = 1):
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        if n_stages < 1:
            raise ValueError(f"n_stages must be >= 1, got {n_stages}")
        super().__init__(min_keep=min_keep, alpha=alpha, gamma_max=gamma_max, n_stages=n_stages,
                         rate_grad_scale=rate_grad_scale, score_lr=score_lr)
        self.alpha, self.gamma_max, self.n_stages = alpha, gamma_max, n_stages
        self.rate_grad_scale, self.score_lr = rate_grad_scale, score_lr

    def _run(self, ctx: PruneContext) -> None:
        ctx.pretrain()
        layers = ctx.layers
        density = 1.0 - ctx.sparsity
        k_min = self.alpha * density
        if ctx.structured:
            init = [hydra_init(l).flatten(1).norm(dim=1) for l in layers]
            unit_size = [l.weight[0].numel() for l in layers]
        else:
            init = [hydra_init(l) for l in layers]
            unit_size = [1 for _ in layers]
        scores = [nn.Parameter(s.detach().clone()) for s in init]
        s0 = [s.detach().clone() for s in scores]
        p0 = min(max((density - k_min) / (1.0 - k_min), 1e-4), 1 - 1e-4)
        rates = [nn.Parameter(torch.tensor(math.log(p0 / (1 - p0)), device=ctx.device)) for _ in layers]
        n_units = [s.numel() for s in scores]
        weights_per_layer = torch.tensor([n * z for n, z in zip(n_units, unit_size)],
                                         dtype=torch.float32, device=ctx.device)
        target = density * float(weights_per_layer.sum())

        def act(r):
            return k_min + (1.0 - k_min) * torch.sigmoid(r)

        for layer, s, r, n in zip(layers, scores, rates, n_units):
            gs = self.rate_grad_scale if self.rate_grad_scale is not None else 1.0 / n
            layer.mask_fn = _rate_mask_fn(s, (lambda r=r: act(r)), self.min_keep, gs,
                                          expand_to=ctx.structured)

        steps_per_epoch = max(1, math.ceil(len(ctx.data.train) / ctx.recipe.batch_size))
        total_steps = max(1, ctx.recipe.prune_epochs * steps_per_epoch)
        state = {"step": 0}
        gammas: List[float] = []

        def gamma() -> float:
            stage = min(self.n_stages, int(state["step"] * (self.n_stages + 1) / total_steps))
            return self.gamma_max * stage / self.n_stages

        def extra_loss(model, x, y):
            a = torch.stack([act(r) for r in rates])
            kept = (a * weights_per_layer).sum()
            return gamma() * F.relu(kept / target - 1.0)

        def on_step(step, model):
            state["step"] += 1
            if state["step"] % max(1, total_steps // 8) == 0:
                gammas.append(gamma())

        frozen = freeze_model(ctx.model)
        try:
            ctx.train("prune (rates + scores)", ctx.recipe.prune_epochs, params=scores + rates,
                      lr=self.score_lr if self.score_lr is not None else ctx.recipe.lr,
                      extra_loss=extra_loss, on_step=on_step, config_overrides={"weight_decay": 0.0})
        finally:
            for l in layers:
                l.mask_fn = None
            for p in frozen:
                p.requires_grad_(True)

        with torch.no_grad():
            a = [float(act(r)) for r in rates]
        # Exact budget: learned shares, rescaled to the target, counted in units of each layer.
        shares = [ai * n * z for ai, n, z in zip(a, n_units, unit_size)]
        scale = target / max(sum(shares), 1e-12)
        if ctx.structured:
            keep = self._structured_keep([sh * scale for sh in shares], n_units, unit_size, target)
        else:
            lo = [min(self.min_keep, n) for n in n_units]
            total = max(int(round(target)), sum(lo))
            keep = largest_remainder([sh * scale for sh in shares], total, lo, n_units)
        masks = [topk_mask(s.detach().abs(), k) for s, k in zip(scores, keep)]
        if ctx.structured:
            masks = [expand_filter_mask(l, m) for l, m in zip(layers, masks)]
        ctx.log["layer_density_learned"] = a
        ctx.log["gamma_schedule"] = gammas
        num = sum(float((s.detach() - i).abs().sum()) for s, i in zip(scores, s0))
        ctx.log["score_change"] = num / max(sum(float(i.abs().sum()) for i in s0), 1e-12)
        ctx.log["rate_change"] = float(sum(abs(x - density) for x in a) / len(a))
        ctx.set_masks(masks)
        ctx.finetune()

    def _structured_keep(self, weight_quota, n_units, unit_size, target) -> List[int]:
        lo = [min(self.min_keep, n) for n in n_units]
        keep = [min(max(int(round(q / z)), lo[i]), n_units[i])
                for i, (q, z) in enumerate(zip(weight_quota, unit_size))]
        kept = sum(k * z for k, z in zip(keep, unit_size))
        # Greedy +-1 filter moves until no move brings the weight total closer to the target.
        while True:
            best = None
            for i in range(len(keep)):
                for d in (-1, 1):
                    if lo[i] <= keep[i] + d <= n_units[i]:
                        err = abs(kept + d * unit_size[i] - target)
                        if err < abs(kept - target) - 1e-9 and (best is None or err < best[0]):
                            best = (err, i, d)
            if best is None:
                return keep
            _, i, d = best
            keep[i] += d
            kept += d * unit_size[i]
