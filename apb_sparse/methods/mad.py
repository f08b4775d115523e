"""MAD: masking adversarial damage — second-order adversarial saliency, global prune, AT finetune.

Paper: B.-K. Lee, J. Kim, Y. M. Ro, "Masking Adversarial Damage: Finding Adversarial Saliency for
Robust and Sparse Network", CVPR 2022.

Algorithm (pipeline A, AT/AT, one-shot, global, least-importance-score):
  1. adversarially pretrain (skipped for a ``pretrained`` model);
  2. estimate for every weight the *adversarial damage* of masking it: the second-order Taylor
     term ``0.5 * dw^T H dw`` of the adversarial loss with ``dw = w`` (masking removes the weight),
     the Hessian approximated by the Fisher of the loss on adversarial examples; prune globally the
     weights with the smallest damage;
  3. finetune adversarially (``prune_epochs + finetune_epochs`` at ``recipe.finetune_lr``).

Choices: the paper uses a block K-FAC Fisher and a learned soft mask per batch before measuring
the damage; here the Fisher is diagonal (empirical Fisher from per-micro-batch gradients of the
adversarial loss, micro-batches of ``fisher_batch`` samples over ``n_batches`` minibatches), so
the saliency is ``0.5 * F_ii * w_i^2`` (the Optimal-Brain-Damage form of MAD's criterion). The
adversarial loss is ``train.mode_loss`` with the recipe's mode (PGD). The paper finetunes with
MART; we use the recipe's mode like every method.
"""
from __future__ import annotations

import torch

from .base import PruneContext, PruningMethod, TaxonomyTags, register

__all__ = ["MAD"]


@register
class MAD(PruningMethod):
    """MAD (Lee et al., CVPR'22) with a diagonal Fisher.

    Args:
        n_batches: minibatches of adversarial examples used for the Fisher.
        fisher_batch: samples per gradient in the empirical Fisher.
        min_keep: see :class:`PruningMethod`.
    """

    name = "mad"
    paper = "Lee et al., Masking Adversarial Damage, CVPR 2022"
    tags = TaxonomyTags("A", ("AT(PGD)", "AT(PGD)"), "1S", ("US",), None, ("G",), "LIS")
    structures = ("unstructured",)

    def __init__(self, *, n_batches: int = 8, fisher_batch: int = 16, min_keep: int = 1):
        if n_batches < 1 or fisher_batch < 1:
            raise ValueError("n_batches and fisher_batch must be >= 1")
        super().__init__(min_keep=min_keep, n_batches=n_batches, fisher_batch=fisher_batch)
        self.n_batches, self.fisher_batch = n_batches, fisher_batch

    def saliency(self, ctx: PruneContext):
        from ..train import mode_loss

        config = ctx.recipe.train_config(1)
        model = ctx.model
        fisher = [torch.zeros_like(l.weight) for l in ctx.layers]
        loader = ctx.data.loader("train", ctx.recipe.batch_size, seed=ctx.recipe.seed)
        count = 0
        was_training = model.training
        model.eval()  # BN statistics must not move while measuring
        try:
            for b, (x, y) in enumerate(loader):
                if b >= self.n_batches:
                    break
                x, y = x.to(ctx.device), y.to(ctx.device)
                for xs, ys in zip(x.split(self.fisher_batch), y.split(self.fisher_batch)):
                    model.zero_grad(set_to_none=True)
                    loss = mode_loss(model, xs, ys, config)
                    grads = torch.autograd.grad(loss, [l.weight for l in ctx.layers])
                    for f, g in zip(fisher, grads):
                        f += g.detach() ** 2
                    count += 1
        finally:
            model.train(was_training)
            model.zero_grad(set_to_none=True)
        return [0.5 * (f / max(1, count)) * l.weight.detach() ** 2 for f, l in zip(fisher, ctx.layers)]

    def _run(self, ctx: PruneContext) -> None:
        ctx.pretrain()
        ctx.set_masks(ctx.unit_scores_to_masks(self.saliency(ctx), local=False))
        ctx.finetune(ctx.recipe.prune_epochs + ctx.recipe.finetune_epochs)
