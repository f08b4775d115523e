"""PwoA: pruning a robust model without adversarial examples (self-distillation + HSIC bottleneck).

Paper: T. Jian, Z. Wang, Y. Wang, J. Dy, S. Ioannidis, "Pruning Adversarially Robust Neural
Networks without Adversarial Examples", ICDM 2022.

Algorithm (pipeline A, AT(TRADES) / KD, one-shot, local, solver-based LWM):
  1. adversarially pretrain (skipped for a ``pretrained`` model); a frozen copy is the teacher;
  2. ADMM pruning (as in RADMM: Z = per-layer top-k projection of W + U, U += W - Z) where the
     loss contains *no adversarial examples*: ``T^2 * KL(teacher || student)`` on natural inputs
     (temperature ``T = 30``, PwoA's distill weight 1, cross-entropy weight 0) plus the HSIC
     bottleneck ``sum_j lambda_x HSIC(X, Z_j) - lambda_y HSIC(Y, Z_j)`` over hidden activations Z_j
     (``lambda_x = 0.005``, ``lambda_y = 0.05``, Gaussian kernel sigma 5, linear kernel on one-hot
     labels: the paper's CIFAR-10 settings);
  3. hard prune to ``Proj_S(W)`` and finetune with the same distillation + HSIC loss (PwoA's
     finetuning type is KD).

Choices: hidden activations Z_j are the outputs of every prunable conv layer (the paper uses the
blocks of its networks); Gaussian kernels use squared distances divided by the feature dimension
(so sigma 5 is meaningful for any width); ADMM x1.3 per update as in the PwoA config
(``multi_rho``, rho 1e-2 there), 10 updates spread over ``prune_epochs``, the start rho scaled to
the budget exactly as in RADMM. Training phases run in the
"natural" mode with the loss replaced, so no attack is ever run. The structured variant projects
onto whole filters (the paper reports unstructured only; the survey lists it as US).
"""
from __future__ import annotations

import copy
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import PruneContext, PruningMethod, TaxonomyTags, register
from .radmm import ADMMState, local_unit_keep, run_admm

__all__ = ["PwoA", "hsic"]


def _gaussian_gram(z: Tensor, sigma: float) -> Tensor:
    z = z.flatten(1).float()
    d2 = torch.cdist(z, z).pow(2) / max(1, z.shape[1])
    return torch.exp(-d2 / (2 * sigma ** 2))


def hsic(kx: Tensor, ky: Tensor) -> Tensor:
    """Biased HSIC estimate ``tr(Kx H Ky H) / (m - 1)^2`` from two Gram matrices."""
    m = kx.shape[0]
    h = torch.eye(m, device=kx.device) - 1.0 / m
    return torch.trace(kx @ h @ ky @ h) / max(1, (m - 1)) ** 2


@register
class PwoA(PruningMethod):
    """PwoA (Jian et al., ICDM'22): ADMM pruning with self-distillation and HSIC bottleneck.

    Args:
        temperature: distillation temperature.
        lambda_x, lambda_y: HSIC bottleneck weights.
        sigma: Gaussian kernel width.
        rho, rho_growth, n_updates: ADMM penalty schedule (see RADMM).
        min_keep: see :class:`PruningMethod`.
    """

    name = "pwoa"
    paper = "Jian et al., Pruning Adversarially Robust Neural Networks without Adversarial Examples, ICDM 2022"
    tags = TaxonomyTags("A", ("AT(TRADES)", "KD"), "1S", ("US",), None, ("L",), "SOLWM")
    structures = ("unstructured", "filter")

    def __init__(self, *, temperature: float = 30.0, lambda_x: float = 0.005, lambda_y: float = 0.05,
                 sigma: float = 5.0, rho=None, rho_growth: float = 1.3, n_updates: int = 10,
                 min_keep: int = 1):
        super().__init__(min_keep=min_keep, temperature=temperature, lambda_x=lambda_x,
                         lambda_y=lambda_y, sigma=sigma, rho=rho, rho_growth=rho_growth,
                         n_updates=n_updates)
        self.temperature, self.lambda_x, self.lambda_y, self.sigma = temperature, lambda_x, lambda_y, sigma
        self.rho, self.rho_growth, self.n_updates = rho, rho_growth, n_updates

    def _loss_fn(self, ctx: PruneContext, teacher: nn.Module):
        acts: List[Tensor] = []
        hooks = [l.register_forward_hook(lambda m, i, o: acts.append(o)) for l in ctx.layers
                 if not isinstance(l, nn.Linear)]
        T = self.temperature

        def loss_fn(model, x, y):
            acts.clear()
            logits = model(x)
            with torch.no_grad():
                t_logits = teacher(x)
            kd = F.kl_div(F.log_softmax(logits / T, dim=1), F.softmax(t_logits / T, dim=1),
                          reduction="batchmean") * T * T
            kx = _gaussian_gram(x, self.sigma)
            yo = F.one_hot(y, logits.shape[1]).float()
            ky = yo @ yo.t()
            reg = logits.new_zeros(())
            for z in acts:
                kz = _gaussian_gram(z, self.sigma)
                reg = reg + self.lambda_x * hsic(kx, kz) - self.lambda_y * hsic(ky, kz)
            acts.clear()
            return kd + reg

        return loss_fn, hooks

    def _run(self, ctx: PruneContext) -> None:
        ctx.pretrain()
        teacher = copy.deepcopy(ctx.model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        loss_fn, hooks = self._loss_fn(ctx, teacher)
        try:
            admm = ADMMState(ctx.layers, local_unit_keep(ctx, self.min_keep), structured=ctx.structured,
                             rho=self.rho, rho_growth=self.rho_growth)
            run_admm(ctx, admm, self.n_updates, phase="prune (ADMM, KD + HSIC)",
                     lr=ctx.recipe.finetune_lr, mode="natural", loss_fn=loss_fn)
            ctx.set_masks(admm.final_masks())
            ctx.finetune(mode="natural", loss_fn=loss_fn)
        finally:
            for h in hooks:
                h.remove()
