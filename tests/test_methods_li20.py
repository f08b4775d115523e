"""apb_sparse.methods.li20 (Li20): behaviours of the authors' code (see docs/methods.md)."""
from __future__ import annotations

import pytest

from apb_sparse import methods
from apb_sparse.methods.li20 import mean_normalized_magnitude
from apb_sparse.nn import masked_layers, to_masked
from methods_fixtures import ZERO, _layer_density, _model
from methods_fixtures import _digits_256 as _data
from methods_fixtures import _one_thread  # noqa: F401  (module-scoped autouse fixture: one torch thread)


def test_li20_normalises_each_layer_before_the_global_threshold():
    """At 99 % on a fresh network, raw |w| would keep the small-fan-in layers nearly dense."""
    res = methods.Li20().prune(_model(width=16), _data(), sparsity=0.99, recipe=ZERO)
    dens = _layer_density(res.model)
    # Raw |w|: the first conv (fan-in 9) keeps ~17 %, the wide convs ~0.6 %. Normalised: every
    # layer within 2x of the 1 % target (the Kaiming-uniform classifier has a lighter tail than
    # the Kaiming-normal convs, so it keeps less, as with the authors' normalisation).
    assert max(dens) < 2 * 0.01, dens
    fresh = [l for _, l in masked_layers(to_masked(_model(width=16)))]
    assert all(float(s.mean()) == pytest.approx(1.0) for s in mean_normalized_magnitude(fresh))
