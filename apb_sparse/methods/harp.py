"""HARP: holistic adversarially robust pruning — learn per-layer rates and per-weight scores.

Paper: Q. Zhao, C. Wressnegger, "Holistic Adversarially Robust Pruning", ICLR 2023. Authors' code:
https://github.com/intellisec/harp. What is followed and what differs: ``docs/methods.md`` (HARP).

Algorithm (pipeline A, AT/AT, one-shot, global budget, least-importance-score), as in the
authors' ``harp_prune`` / ``harp_finetune`` modes:
  1. adversarially pretrain (skipped for a ``pretrained`` model);
  2. freeze the conv / linear weights and biases (BatchNorm affine parameters stay trainable, as
     in the authors' default ``freeze_bn=False``); learn (a) a score per weight, initialised to
     HYDRA's scaled magnitude ``sqrt(6 / fan_in) * w / max|w|`` (the authors switch this init on
     for ``harp_prune``), and (b) one rate per layer: the layer keeps the top ``a_l = k_min +
     (1 - k_min) * sigmoid(r_l)`` fraction of its scores, ``k_min = alpha * (1 - sparsity)``.
     Every layer starts at density ``max(init_density, 1 - sparsity)`` (the authors' ``010_uni``
     strategy: 10 % in every layer, i.e. above the target for 95 / 99 % sparsity). The hard top-k
     passes its gradient straight through to the scores, and the rate receives the **sum** of the
     gradients w.r.t. the layer's mask entries (the authors' ``GetSubnet.backward``);
  3. the loss is ``robust_loss + gamma_t * relu(kept(a) / target - 1)`` with ``kept(a) =
     sum_l a_l n_l`` (differentiable in the rates). ``gamma_t`` is the authors' dynamic schedule:
     ``(stage + 1) * gamma`` and frozen at its current value from the first stage at whose end the
     compression loss is zero (the target is met); a stage is one epoch of the pruning phase;
  4. the learned rates set each layer's share of the exact global budget (largest-remainder
     rounding of ``a_l n_l`` rescaled to ``(1 - sparsity) N``), the mask is the per-layer top-k of
     the scores, and the kept weights are finetuned adversarially (``finetune_epochs`` at
     ``recipe.finetune_lr``; the authors finetune at 0.01).

Budget guarantee: the gamma schedule needs several stages. When ``prune_epochs < min_stages``
(e.g. the quick preset's single pruning epoch) the pruning phase is cut into ``min_stages``
stages by iteration instead of by epoch (each at least one step; with fewer steps than
``min_stages`` every step is a stage), so the rates always see the robustness-first stage and
the rising penalty.

Differences (also in the doc): the exact-budget rescaling of step 4 (the authors keep the learned
rates and pick the best checkpoint after the target is met, so their final density can be below
the target); the structured variant scores whole output filters of every conv layer with a
budget counted in weights (the authors score input channels and count FLOPs); the robust loss
is the recipe's mode (the authors' default ``adv_loss`` is PGD; TRADES and MART are options);
rates, scores and BN share one SGD optimiser at ``score_lr`` (default ``recipe.lr``; authors 0.1)
with the recipe's weight decay (authors 5e-4) and learning-rate schedule.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import PruningMethod
from .context import PruneContext
from .masks import expand_filter_mask, largest_remainder, topk_mask, topk_mask_cached
from .registry import register
from .tags import TaxonomyTags

__all__ = ["HARP", "harp_stage_bounds"]


def _scaled_score(layer: nn.Module) -> Tensor:
    """HYDRA / HARP scaled-magnitude score init ``sqrt(6 / fan_in) * w / max|w|``."""
    w = layer.weight.detach()
    return math.sqrt(6.0 / w[0].numel()) * w / w.abs().max().clamp_min(1e-12)


def harp_stage_bounds(prune_epochs: int, steps_per_epoch: int, min_stages: int) -> List[int]:
    """Cumulative step counts at which HARP's gamma stages end.

    One stage per epoch (the authors' schedule) when ``prune_epochs >= min_stages``, else
    ``min_stages`` stages of (nearly) equal length by iteration; never more stages than steps.
    """
    total = max(0, int(prune_epochs) * int(steps_per_epoch))
    if total == 0:
        return []
    if prune_epochs >= min_stages:
        return [steps_per_epoch * (e + 1) for e in range(prune_epochs)]
    n = min(int(min_stages), total)
    return [int(round(total * (i + 1) / n)) for i in range(n)]


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
        # Keyed on the values, not s._version: fused optimisers do not bump the version counter.
        mask = topk_mask_cached(cache, s, k)
        m = _RateTopK.apply(s.abs(), a, mask, grad_scale)
        return expand_filter_mask(layer, m) if expand_to else m
    return mask_fn


@register
class HARP(PruningMethod):
    """HARP (Zhao & Wressnegger, ICLR'23): learned per-layer rates + scores under a global budget.

    Args:
        alpha: ``k_min = alpha * (1 - sparsity)``, the smallest density a layer may reach
            (authors: 0.1).
        init_density: density every layer starts from; the start is ``max(init_density,
            1 - sparsity)`` (authors' ``010_uni``: 0.1).
        gamma: increment of the compression weight per stage (authors' README: 0.01 for CIFAR
            weight pruning).
        gamma_max: optional cap on the compression weight (None: no cap, as the authors).
        n_stages: None (derived, see ``min_stages``) or a fixed number of equal stages.
        min_stages: fewest gamma stages of the pruning phase (see the module docstring).
        rate_grad_scale: multiplier of the summed mask gradient reaching the rate (1: the
            authors' sum; None is read as 1).
        score_lr: learning rate of scores, rates and BN (None: ``recipe.lr``).
        train_bn: train BatchNorm affine parameters with the scores (authors' default).
        min_keep: see :class:`PruningMethod`.
    """

    name = "harp"
    paper = "Zhao & Wressnegger, Holistic Adversarially Robust Pruning, ICLR 2023"
    # The survey / APB taxonomy file record TRADES for both phases; the authors' code defaults to
    # PGD (``--adv_loss pgd``). The tag must equal apb_sparse.taxonomy's entry (tests), so it keeps
    # the survey's value; the loss actually used is the recipe's mode.
    tags = TaxonomyTags("A", ("AT(PGD)", "AT(PGD)"), "1S", ("US", "S"), "channels", ("G",), "LIS")
    structures = ("unstructured", "filter")
    notes = ("exact-budget rescaling of the learned rates; stages by iteration when prune_epochs < 5; "
             "structured: output filters, budget in weights (authors: input channels, FLOPs); recipe loss")
    code_url = "https://github.com/intellisec/harp"

    def __init__(self, *, alpha: float = 0.1, init_density: float = 0.1, gamma: float = 0.01,
                 gamma_max: Optional[float] = None, n_stages: Optional[int] = None,
                 min_stages: int = 5, rate_grad_scale: Optional[float] = 1.0, score_lr=None,
                 train_bn: bool = True, min_keep: int = 1):
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        if not 0.0 < init_density <= 1.0:
            raise ValueError(f"init_density must be in (0, 1], got {init_density}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if gamma_max is not None and gamma_max < 0:
            raise ValueError(f"gamma_max must be >= 0 or None, got {gamma_max}")
        if n_stages is not None and (not isinstance(n_stages, int) or n_stages < 1):
            raise ValueError(f"n_stages must be an int >= 1 or None, got {n_stages!r}")
        if not isinstance(min_stages, int) or min_stages < 1:
            raise ValueError(f"min_stages must be an int >= 1, got {min_stages!r}")
        super().__init__(min_keep=min_keep, alpha=alpha, init_density=init_density, gamma=gamma,
                         gamma_max=gamma_max, n_stages=n_stages, min_stages=min_stages,
                         rate_grad_scale=rate_grad_scale, score_lr=score_lr, train_bn=train_bn)
        self.alpha, self.init_density, self.gamma, self.gamma_max = alpha, init_density, gamma, gamma_max
        self.n_stages, self.min_stages = n_stages, min_stages
        self.rate_grad_scale = 1.0 if rate_grad_scale is None else float(rate_grad_scale)
        self.score_lr, self.train_bn = score_lr, train_bn

    def _stage_bounds(self, prune_epochs: int, steps_per_epoch: int) -> List[int]:
        if self.n_stages is None:
            return harp_stage_bounds(prune_epochs, steps_per_epoch, self.min_stages)
        total = prune_epochs * steps_per_epoch
        n = min(self.n_stages, total)
        return [int(round(total * (i + 1) / n)) for i in range(n)] if n else []

    def _run(self, ctx: PruneContext) -> None:
        ctx.pretrain()
        layers = ctx.layers
        density = 1.0 - ctx.sparsity
        k_min = self.alpha * density
        if ctx.structured:
            init = [_scaled_score(l).flatten(1).abs().sum(dim=1) for l in layers]
            unit_size = [l.weight[0].numel() for l in layers]
        else:
            init = [_scaled_score(l) for l in layers]
            unit_size = [1 for _ in layers]
        scores = [nn.Parameter(s.detach().clone()) for s in init]
        s0 = [s.detach().clone() for s in scores]
        start = max(self.init_density, density)
        # Inverse of the rate activation, clipped like the authors' rate_init_func.
        p0 = min(max((start - k_min) / (1.0 - k_min), 1e-2), 1 - 1e-2)
        rates = [nn.Parameter(torch.tensor(math.log(p0 / (1 - p0)), device=ctx.device)) for _ in layers]
        n_units = [s.numel() for s in scores]
        weights_per_layer = torch.tensor([n * z for n, z in zip(n_units, unit_size)],
                                         dtype=torch.float32, device=ctx.device)
        target = density * float(weights_per_layer.sum())

        def act(r):
            return k_min + (1.0 - k_min) * torch.sigmoid(r)

        def hw_loss() -> Tensor:
            a = torch.stack([act(r) for r in rates])
            return F.relu((a * weights_per_layer).sum() / target - 1.0)

        for layer, s, r in zip(layers, scores, rates):
            layer.mask_fn = _rate_mask_fn(s, (lambda r=r: act(r)), self.min_keep,
                                          self.rate_grad_scale, expand_to=ctx.structured)

        steps_per_epoch = max(1, math.ceil(len(ctx.data.train) / ctx.recipe.batch_size))
        bounds = self._stage_bounds(ctx.recipe.prune_epochs, steps_per_epoch)
        state = {"step": 0, "stage": 0, "frozen": None}
        stages: List[dict] = []

        def gamma() -> float:
            if state["frozen"] is not None:
                return state["frozen"]
            g = (state["stage"] + 1) * self.gamma
            return g if self.gamma_max is None else min(g, self.gamma_max)

        def extra_loss(model, x, y):
            return gamma() * hw_loss()

        def on_step(step, model):
            state["step"] += 1
            if state["stage"] < len(bounds) and state["step"] >= bounds[state["stage"]]:
                with torch.no_grad():
                    loss = float(hw_loss())
                    dens = [float(act(r)) for r in rates]
                g = gamma()
                stages.append({"step": state["step"], "gamma": g, "hw_loss": loss,
                               "max_min_density": max(dens) / max(min(dens), 1e-12)})
                # The authors freeze gamma once the rounded compression loss is zero.
                if state["frozen"] is None and round(loss, 4) == 0.0:
                    state["frozen"] = g
                state["stage"] += 1

        bn_params = []
        if self.train_bn:
            for m in ctx.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                    bn_params += [m.weight, m.bias]
        frozen = [p for p in ctx.model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        for p in bn_params:
            p.requires_grad_(True)
        try:
            ctx.train("prune (rates + scores)", ctx.recipe.prune_epochs,
                      params=scores + rates + bn_params,
                      lr=self.score_lr if self.score_lr is not None else ctx.recipe.lr,
                      extra_loss=extra_loss, on_step=on_step)
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
        ctx.log["layer_density_start"] = start
        ctx.log["layer_density_learned"] = a
        ctx.log["layer_density_ratio"] = max(a) / max(min(a), 1e-12)
        ctx.log["gamma_stages"] = stages
        ctx.log["gamma_schedule"] = [st["gamma"] for st in stages]
        num = sum(float((s.detach() - i).abs().sum()) for s, i in zip(scores, s0))
        ctx.log["score_change"] = num / max(sum(float(i.abs().sum()) for i in s0), 1e-12)
        ctx.log["rate_change"] = float(sum(abs(x - start) for x in a) / len(a))
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
