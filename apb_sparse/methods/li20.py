"""Li20: boosting tickets — FGSM-trained magnitude ticket, rewound and trained with PGD.

Paper: B. Li, S. Wang, Y. Jia, Y. Lu, Z. Zhong, L. Carin, S. Jana, "Towards Practical Lottery
Ticket Hypothesis for Adversarial Training", arXiv 2003.05733 (2020). Authors' code:
https://github.com/boosting-ticket/ticket_robust. What is followed and what differs:
``docs/methods.md`` (Li20).

Algorithm (pipeline B, FGSM / AT, one-shot, global, LWM):
  1. from a random initialisation W0, train the dense network with cheap FGSM adversarial
     training for ``search_share`` of the recipe's total epochs (at least ``prune_epochs``);
  2. prune once: normalise every layer's ``|w|`` by its mean ``|w|``, then one global
     lowest-magnitude threshold on the normalised values at the target sparsity (the authors'
     ``weight_prune``, "normalization (important)"; every conv and linear layer, the last one
     included) — the "boosting ticket";
  3. rewind the kept weights to W0 (lottery-ticket rewinding) and train the ticket with PGD
     adversarial training for the rest of the total budget at ``recipe.lr``.

Budget: the authors search for 20 FGSM epochs and train the ticket for 100 (``--train_epochs
20 --enhance_epochs 100`` in ``scripts/*/fgsm_convergence``), a search share of 1/6. The search
gets ``max(prune_epochs, round(total / 6))`` epochs of the recipe's ``total_epochs`` and the
ticket the rest, so the method's total is every method's (quick preset: 2 + 12 of 14; with the
recipe's 1-epoch prune phase as the search, the 90 %-sparse classifier kept 1 of 640 weights).

Choices: FGSM with a random start (train.py's "fgsm" mode) at the recipe's eps; one-shot rather
than iterative magnitude pruning (the authors' ``n_pruning_steps`` default 1: one cheap round
finds a ticket that converges fast); rewinding to initialisation (the authors' ``--init``, not
to an early iterate); BatchNorm parameters and running statistics are rewound too. The exact
global top-k replaces the authors' ``np.percentile`` threshold (equal values may differ by a few
weights). Minimum steps: one FGSM step before the mask is drawn (``prune_epochs >= 1``; with 0
the mask is drawn at initialisation).
"""
from __future__ import annotations

import copy

import torch

from .base import PruneContext, PruningMethod, TaxonomyTags, register

__all__ = ["Li20", "mean_normalized_magnitude"]


def mean_normalized_magnitude(layers) -> list:
    """``|w| / mean|w|`` per layer (a layer of zeros keeps its zeros), Li20's pruning score."""
    out = []
    for l in layers:
        a = l.weight.detach().abs()
        m = a.mean()
        out.append(a / m if float(m) > 0 else a)
    return out


@register
class Li20(PruningMethod):
    """Boosting tickets (Li et al. 2020).

    Args:
        search_mode: training mode of the ticket search (default "fgsm").
        rewind: reset kept weights to their initial values before training the ticket.
        min_keep: see :class:`PruningMethod`.
    """

    name = "li20"
    paper = "Li et al., Towards Practical Lottery Ticket Hypothesis for Adversarial Training, arXiv 2020"
    tags = TaxonomyTags("B", ("FGSM", "AT(PGD)"), "1S", ("US",), None, ("G",), "LWM")
    structures = ("unstructured",)
    notes = ("exact global top-k instead of a percentile threshold; recipe LR schedule; search = 1/6 of "
             "the total budget (authors: 20 FGSM + 100 PGD epochs)")
    code_url = "https://github.com/boosting-ticket/ticket_robust"

    def __init__(self, *, search_mode: str = "fgsm", rewind: bool = True, search_share: float = 1 / 6,
                 min_keep: int = 1):
        if not 0.0 <= float(search_share) < 1.0:
            raise ValueError(f"search_share must be in [0, 1), got {search_share!r}")
        super().__init__(min_keep=min_keep, search_mode=search_mode, rewind=rewind, search_share=search_share)
        self.search_mode, self.rewind, self.search_share = search_mode, rewind, float(search_share)

    def search_epochs(self, recipe) -> int:
        """FGSM search epochs: ``search_share`` of the total budget, at least ``prune_epochs``,
        leaving at least one epoch for the ticket when the budget has two or more."""
        total = recipe.total_epochs
        e = max(recipe.prune_epochs, int(round(self.search_share * total)))
        return min(e, max(total - 1, recipe.prune_epochs if total <= 1 else 1))

    def _run(self, ctx: PruneContext) -> None:
        init_state = copy.deepcopy(ctx.model.state_dict())
        search = self.search_epochs(ctx.recipe)
        ctx.train("ticket search", search, mode=self.search_mode, lr=ctx.recipe.lr)
        masks = ctx.unit_scores_to_masks(mean_normalized_magnitude(ctx.layers), local=False)
        if self.rewind:
            ctx.model.load_state_dict(init_state)
        ctx.set_masks(masks)
        ctx.train("train ticket", max(0, ctx.recipe.total_epochs - search), lr=ctx.recipe.lr)
