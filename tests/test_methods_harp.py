"""apb_sparse.methods.harp (HARP): behaviours of the authors' code (see docs/methods.md)."""
from __future__ import annotations

import pytest

from apb_sparse import methods
from apb_sparse.methods.harp import harp_stage_bounds
from apb_sparse.nn import masked_layers
from methods_fixtures import RECIPE, _pretrained
from methods_fixtures import _digits_256 as _data
from methods_fixtures import _one_thread  # noqa: F401  (module-scoped autouse fixture: one torch thread)


def test_harp_learns_non_uniform_densities_from_summed_mask_gradients():
    """At 99 % HARP starts every layer at 10 % and the summed mask gradients move the rates apart.

    The layers' summed mask gradients differ by orders of magnitude (layer sizes 36 to 2,304 at
    width 4), so the rates separate; a per-layer *mean* of the mask gradients started at the
    target (the previous implementation) left them exactly uniform (max/min 1.00).
    """
    # score_lr 0.5: eight steps have to do what the authors' 7,820 steps at 0.1 do.
    res = methods.HARP(score_lr=0.5).prune(_pretrained(), _data(), sparsity=0.99,
                                           recipe=RECIPE.replace(finetune_epochs=0), pretrained=True)
    log = res.log
    a = log["layer_density_learned"]
    assert max(a) / min(a) > 1.3, a
    assert log["layer_density_start"] == pytest.approx(0.1)
    # The exact global budget still holds after the learned allocation.
    n = sum(l.weight.numel() for _, l in masked_layers(res.model))
    assert sum(int(l.weight_mask.sum()) for _, l in masked_layers(res.model)) == round(0.01 * n)


def test_harp_gamma_schedule_has_several_stages_even_in_one_epoch():
    assert harp_stage_bounds(1, 12, 5) == [2, 5, 7, 10, 12]          # quick preset: 5 stages by iteration
    assert harp_stage_bounds(20, 391, 5) == [391 * (e + 1) for e in range(20)]  # authors: per epoch
    assert harp_stage_bounds(1, 3, 5) == [1, 2, 3]                   # fewer steps than stages
    assert harp_stage_bounds(0, 12, 5) == []
    log = methods.HARP().prune(_pretrained(), _data(), sparsity=0.99,
                               recipe=RECIPE.replace(finetune_epochs=0), pretrained=True).log
    g = log["gamma_schedule"]
    assert len(g) == 5
    # (stage + 1) * gamma until the target is met (then frozen): never decreasing, starts at gamma.
    assert g[0] == pytest.approx(0.01) and all(b >= a for a, b in zip(g, g[1:]))
