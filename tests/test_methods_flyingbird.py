"""apb_sparse.methods.flyingbird (FlyingBird, IGQ allocation): behaviours of the authors' code (see docs/methods.md)."""
from __future__ import annotations

from apb_sparse import methods
from apb_sparse.methods.flyingbird import flyingbird_update_steps, igq_keep
from apb_sparse.nn import masked_layers, to_masked
from methods_fixtures import RECIPE, STEPS_PER_EPOCH, _model
from methods_fixtures import _digits_256 as _data
from methods_fixtures import _one_thread  # noqa: F401  (module-scoped autouse fixture: one torch thread)


def _recorded_flyingbird(**kw):
    """A FlyingBird whose prune/regrow updates record the per-layer kept counts."""
    fb = methods.FlyingBird(**kw)
    seen = []
    inner = fb._prune_regrow

    def recording(layers, rate, gen):
        out = inner(layers, rate, gen)
        seen.append([int(l.weight_mask.sum()) for l in layers])
        return out

    fb._prune_regrow = recording
    return fb, seen


def test_flyingbird_prunes_and_regrows_within_each_layer_until_the_end():
    fb, seen = _recorded_flyingbird()
    recipe = RECIPE.replace(pretrain_epochs=2)  # 4 epochs = 32 steps
    res = fb.prune(_model(), _data(), sparsity=0.9, recipe=recipe)
    layers = [l for _, l in masked_layers(res.model)]
    initial = igq_keep(layers, 0.9)  # the authors' default allocation
    assert len(seen) >= 4
    assert all(counts == initial for counts in seen)
    assert [int(l.weight_mask.sum()) for l in layers] == initial
    total = 4 * STEPS_PER_EPOCH
    steps = [u["step"] for u in res.log["updates"]]
    assert steps[-1] > 0.9 * total  # the topology keeps changing until the end of training
    assert sum(u["moved"] for u in res.log["updates"]) > 0


def test_flyingbird_schedule_guarantees_several_updates():
    assert len(flyingbird_update_steps(12)) >= 4            # one 12-step epoch
    assert len(flyingbird_update_steps(96)) >= 4            # quick preset: 8 epochs of 12 steps
    assert flyingbird_update_steps(2) == [1, 2]
    ref = flyingbird_update_steps(200 * 391)                # the authors' CIFAR run
    assert ref[0] == 900 and ref[-1] <= 200 * 391 and 70 <= len(ref) <= 80
    assert flyingbird_update_steps(10, update_every=3) == [3, 6, 9]


def test_igq_allocation_is_exact_and_favours_small_layers():
    layers = [l for _, l in masked_layers(to_masked(_model(width=8)))]
    keep = igq_keep(layers, 0.95)
    sizes = [l.weight.numel() for l in layers]
    assert sum(keep) == round(0.05 * sum(sizes))
    dens = [k / n for k, n in zip(keep, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    assert all(dens[a] >= dens[b] - 1e-9 for a, b in zip(order, order[1:]))
