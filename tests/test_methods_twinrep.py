"""apb_sparse.methods.twinrep (TwinRep): behaviours of the authors' code (see docs/methods.md)."""
from __future__ import annotations

import math

import pytest
import torch

from apb_sparse import methods
from apb_sparse.nn import MaskedConv2d, masked_layers, to_masked
from methods_fixtures import RECIPE, STEPS_PER_EPOCH, ZERO, _model
from methods_fixtures import _digits_256 as _data
from methods_fixtures import _one_thread  # noqa: F401  (module-scoped autouse fixture: one torch thread)


def test_twinrep_both_factors_start_random():
    """With no training the folded weight is w * v: v is a Kaiming draw, not ones."""
    model = _model(width=8)
    res = methods.TwinRep().prune(model, _data(), sparsity=0.5, recipe=ZERO)
    for (_, new), (_, old) in zip(masked_layers(res.model), masked_layers(to_masked(model))):
        kept = new.weight_mask.bool()
        ratio = new.weight.detach()[kept] / old.weight.detach()[kept]
        # v = ratio: spread over +-1/sqrt(fan_in) like a Kaiming-uniform draw, of both signs.
        bound = 1.0 / math.sqrt(old.weight[0].numel())
        assert float(ratio.abs().max()) <= bound + 1e-6
        assert float((ratio > 0).float().mean()) == pytest.approx(0.5, abs=0.2)
        assert float(ratio.std()) > 0.3 * bound


def test_twinrep_structured_mixes_output_filters():
    """Channel-Rep: w_eff = A @ w, so a kept filter is a mixture of the original filters."""
    model = _model(width=8)
    res = methods.TwinRep().prune(model, _data(), sparsity=0.5, structure="filter", recipe=ZERO)
    convs = [(n, l) for n, l in masked_layers(res.model) if isinstance(l, MaskedConv2d)]
    olds = dict(masked_layers(to_masked(model)))
    for name, new in convs:
        old = olds[name].weight.detach().flatten(1)
        w = new.weight.detach().flatten(1)
        kept = w.norm(dim=1) > 0
        cos = torch.nn.functional.cosine_similarity(w[kept], old[kept], dim=1).abs()
        assert float(cos.max()) < 0.999  # not a per-filter rescaling of the original filter


def test_twinrep_prunes_before_the_end_of_a_one_epoch_run():
    recipe = RECIPE.replace(pretrain_epochs=0, prune_epochs=1, finetune_epochs=0)
    log = methods.TwinRep().prune(_model(), _data(), sparsity=0.9, recipe=recipe).log
    assert 1 <= log["prune_step"] < STEPS_PER_EPOCH
