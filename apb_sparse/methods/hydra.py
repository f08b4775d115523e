"""HYDRA: learn per-weight importance scores under the robust loss, then finetune.

Paper: V. Sehwag, S. Wang, P. Mittal, S. Jana, "HYDRA: Pruning Adversarially Robust Neural
Networks", NeurIPS 2020. Authors' code: https://github.com/inspire-group/hydra. What follows the
authors and what does not, with every scale-down: docs/methods.md (section HYDRA).

Algorithm (pipeline A, AT/AT, one-shot, local, least-importance-score):
  1. adversarially pretrain the dense network (skipped for a ``pretrained`` model);
  2. freeze every conv / linear weight and bias; give each prunable weight a real score
     initialised as ``s = sqrt(6 / fan_in) * w / max|w|`` (HYDRA's scaled-magnitude init, so the
     first mask is the magnitude mask); the layer computes with ``w * topk(|s|)`` where the top-k is
     per layer at the target density and its gradient passes straight through to ``s``; train the
     scores *and the BatchNorm affine parameters* (HYDRA's ``freeze_vars`` leaves BatchNorm
     trainable unless ``--freeze-bn``, off by default; its optimiser takes all parameters that
     still require gradients) with the robust loss (SGD, ``lr = recipe.lr`` like HYDRA's 0.1,
     weight decay 1e-4) for ``prune_epochs``; BatchNorm running statistics update too (train
     mode);
  3. fix the mask to the final top-k of |s| and finetune the kept weights adversarially for
     ``finetune_epochs`` at ``recipe.finetune_lr`` (HYDRA: 0.01).

Minimum algorithmic steps: one score-learning epoch (``prune_epochs >= 1``; every preset has it);
with ``prune_epochs=0`` the mask is the initial score mask, i.e. layer-wise magnitude pruning.

Differences from the authors, and why: the robust loss is the recipe's mode in every phase
(HYDRA used TRADES; pass ``Recipe(mode="trades")`` to match) and the learning rate follows the
recipe's scheduler (HYDRA: cosine, the same by default), so all methods share one recipe.
Structured pruning is not part of HYDRA and not offered.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import Tensor, nn

from .base import PruningMethod
from .context import PruneContext
from .masks import cached_ste_topk, largest_remainder, topk_mask
from .registry import register
from .tags import TaxonomyTags

__all__ = ["HYDRA", "ScoreMasks", "freeze_model", "hydra_init", "batchnorm_parameters", "local_keep"]


class ScoreMasks:
    """Learnable scores driving masks through a straight-through per-layer top-k.

    Args:
        layers: masked layers to drive.
        scores: one tensor per layer (weight-shaped); wrapped as leaf parameters.
        keep: kept weights per layer.
    """

    def __init__(self, layers: Sequence[nn.Module], scores: Sequence[Tensor], keep: Sequence[int]):
        self.layers = list(layers)
        self.scores = [nn.Parameter(s.detach().clone()) for s in scores]
        self.keep = [int(k) for k in keep]
        self.initial = [s.detach().clone() for s in self.scores]

    def install(self) -> None:
        for layer, s, k in zip(self.layers, self.scores, self.keep):
            layer.mask_fn = cached_ste_topk(s, lambda k=k: k)

    def remove(self) -> None:
        for layer in self.layers:
            layer.mask_fn = None

    def masks(self) -> List[Tensor]:
        return [topk_mask(s.detach().abs(), k) for s, k in zip(self.scores, self.keep)]

    def relative_change(self) -> float:
        """Mean |s - s0| / mean |s0| over all scores (0 when nothing moved)."""
        num = sum(float((s.detach() - s0).abs().sum()) for s, s0 in zip(self.scores, self.initial))
        den = sum(float(s0.abs().sum()) for s0 in self.initial)
        return num / max(den, 1e-12)

    def mask_change(self, initial_masks: Sequence[Tensor]) -> float:
        """Fraction of kept positions that differ from ``initial_masks``."""
        diff = sum(float((m - m0.to(m.device)).abs().sum()) for m, m0 in zip(self.masks(), initial_masks))
        return diff / max(1, 2 * sum(self.keep))


def local_keep(layers: Sequence[nn.Module], sparsity: float, min_keep: int) -> List[int]:
    """Exact per-layer kept counts for a local budget (largest-remainder rounding)."""
    sizes = [l.weight.numel() for l in layers]
    lo = [min(min_keep, n) for n in sizes]
    total = max(int(round((1.0 - sparsity) * sum(sizes))), sum(lo))
    return largest_remainder([(1.0 - sparsity) * n for n in sizes], total, lo, sizes)


def batchnorm_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The affine parameters (weight, bias) of every BatchNorm layer of ``model``."""
    return [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in (m.weight, m.bias) if p is not None]


def freeze_model(model: nn.Module, *, keep_batchnorm: bool = False) -> List[nn.Parameter]:
    """Turn off requires_grad on every parameter; returns those that had it on.

    Args:
        model: the network.
        keep_batchnorm: leave BatchNorm affine parameters trainable (HYDRA's code: its
            ``freeze_vars`` skips BatchNorm unless ``--freeze-bn``, which is off by default).
            Default False: freeze everything (RST's non-affine BatchNorm, HARP).
    """
    keep = {id(p) for p in batchnorm_parameters(model)} if keep_batchnorm else set()
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def hydra_init(layer: nn.Module) -> Tensor:
    """HYDRA's score init: ``sqrt(6 / fan_in) * w / max|w|``."""
    w = layer.weight.detach()
    fan_in = w[0].numel()
    return math.sqrt(6.0 / fan_in) * w / w.abs().max().clamp_min(1e-12)


@register
class HYDRA(PruningMethod):
    """HYDRA (Sehwag et al., NeurIPS'20): robust score learning, then robust finetuning.

    Args:
        score_init: "hydra" (scaled magnitude, the paper's default) or "kaiming" (edge-popup
            uniform init).
        score_lr: learning rate of the scores (None: ``recipe.lr``).
        score_weight_decay: weight decay on the scores (HYDRA: 1e-4).
        min_keep: see :class:`PruningMethod`.
    """

    name = "hydra"
    paper = "Sehwag et al., HYDRA: Pruning Adversarially Robust Neural Networks, NeurIPS 2020"
    code_url = "https://github.com/inspire-group/hydra"
    notes = "recipe loss (HYDRA: TRADES) and recipe LR schedule in every phase"
    tags = TaxonomyTags("A", ("AT(TRADES)", "AT(TRADES)"), "1S", ("US",), None, ("L",), "LIS")
    structures = ("unstructured",)

    def __init__(self, *, score_init: str = "hydra", score_lr=None, score_weight_decay: float = 1e-4,
                 train_bn: bool = True, min_keep: int = 1):
        if score_init not in ("hydra", "kaiming"):
            raise ValueError(f"score_init must be 'hydra' or 'kaiming', got {score_init!r}")
        super().__init__(min_keep=min_keep, score_init=score_init, score_lr=score_lr,
                         score_weight_decay=score_weight_decay, train_bn=train_bn)
        self.score_init, self.score_lr, self.score_weight_decay = score_init, score_lr, score_weight_decay
        self.train_bn = bool(train_bn)

    def _init_scores(self, layers):
        if self.score_init == "hydra":
            return [hydra_init(l) for l in layers]
        out = []
        for l in layers:
            s = torch.empty_like(l.weight)
            nn.init.kaiming_uniform_(s, a=math.sqrt(5))
            out.append(s)
        return out

    def _run(self, ctx: PruneContext) -> None:
        ctx.pretrain()
        sm = ScoreMasks(ctx.layers, self._init_scores(ctx.layers),
                        local_keep(ctx.layers, ctx.sparsity, self.min_keep))
        first = sm.masks()
        frozen = freeze_model(ctx.model, keep_batchnorm=self.train_bn)
        bn = batchnorm_parameters(ctx.model) if self.train_bn else []
        sm.install()
        try:
            # HYDRA's optimiser holds every parameter that still has requires_grad: the scores
            # and the BatchNorm affine parameters, with one learning rate and weight decay.
            ctx.train("prune (scores)", ctx.recipe.prune_epochs, params=list(sm.scores) + bn,
                      lr=self.score_lr if self.score_lr is not None else ctx.recipe.lr,
                      config_overrides={"weight_decay": self.score_weight_decay})
        finally:
            sm.remove()
            for p in frozen:
                p.requires_grad_(True)
        ctx.log["score_change"] = sm.relative_change()
        ctx.log["mask_change"] = sm.mask_change(first)
        ctx.set_masks(sm.masks())
        ctx.finetune()
