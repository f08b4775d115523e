"""apb_sparse.methods.robustbird (RobustBird, early-bird test): behaviours of the authors' code (docs/methods.md)."""
from __future__ import annotations

import math

import pytest
import torch

from apb_sparse import methods
from apb_sparse.methods.robustbird import EarlyBirdTest
from methods_fixtures import RECIPE, STEPS_PER_EPOCH, _model
from methods_fixtures import _digits_256 as _data
from methods_fixtures import _one_thread  # noqa: F401  (module-scoped autouse fixture: one torch thread)


class _ScriptedMasks:
    """Replaces RobustBird's magnitude draws by a scripted sequence of exact 50 % masks.

    ``move`` is the fraction of all entries swapped between kept and pruned at every draw
    (0: the masks have converged).
    """

    def __init__(self, move: float, seed: int = 0):
        self.move, self.gen, self.state = move, torch.Generator().manual_seed(seed), {}

    def __call__(self, *args):
        layers = args[0].layers if hasattr(args[0], "layers") else args[0]
        shapes = [l.weight.shape for l in layers]
        n = sum(math.prod(s) for s in shapes)
        flat = self.state.get(n)
        if flat is None:
            flat = torch.zeros(n)
            flat[torch.randperm(n, generator=self.gen)[: n // 2]] = 1
        else:
            k = int(self.move * n / 2)
            on, off = torch.nonzero(flat).flatten(), torch.nonzero(flat == 0).flatten()
            flat = flat.clone()
            flat[on[torch.randperm(on.numel(), generator=self.gen)[:k]]] = 0
            flat[off[torch.randperm(off.numel(), generator=self.gen)[:k]]] = 1
        self.state[n] = flat
        out, start = [], 0
        for s in shapes:
            out.append(flat[start:start + math.prod(s)].view(s).clone())
            start += math.prod(s)
        return out


def _scripted_robustbird(move: float, recipe):
    rb = methods.RobustBird()
    rb._draw = _ScriptedMasks(move)
    return rb.prune(_model(), _data(), sparsity=0.5, recipe=recipe)


def test_robustbird_does_not_stop_while_the_masks_keep_drifting():
    # Consecutive draws differ in 4 % of the weights (< tol), but they drift: the newest is far
    # from the draw four back, so the authors' test (newest vs. each of the 4 earlier) never passes.
    log = _scripted_robustbird(0.04, RECIPE.replace(prune_epochs=2)).log
    assert log["early_bird_step"] is None
    # 16 search steps < 10 draws per interval of 2: a draw after every step, none stops it.
    assert log["mask_draws"] == 16 and log["search_steps_used"] == 2 * STEPS_PER_EPOCH


def test_robustbird_stops_on_converged_masks_and_gives_the_rest_to_the_ticket():
    recipe = RECIPE.replace(prune_epochs=3)  # 24 search steps, 10 draws: every 2 steps
    res = _scripted_robustbird(0.0, recipe)
    log = res.log
    assert log["phases"][0]["mode"] == "natural"  # the authors' stage 1 is standard training
    ticket = log["phases"][-1]
    assert ticket["epochs"] == recipe.pretrain_epochs + recipe.finetune_epochs + 2
    assert log["extra_ticket_epochs"] == 2        # round(14 unused steps / 8)
    assert log["early_bird_step"] == 5 * 2 and log["mask_draws"] == 5
    spent = log["search_steps_used"] + ticket["train_log"].steps  # the search was cut short
    budget = recipe.total_epochs * STEPS_PER_EPOCH
    assert abs(spent - budget) <= STEPS_PER_EPOCH // 2


def test_early_bird_test_compares_with_several_previous_masks():
    base = torch.zeros(1000)
    base[:500] = 1
    t = EarlyBirdTest(window=5, tol=0.08)
    assert [t.put(base) for _ in range(5)] == [False] * 4 + [True]
    drift = EarlyBirdTest(window=5, tol=0.08)
    m = base.clone()
    stops = []
    for i in range(12):
        m = m.clone()
        m[i * 20:(i + 1) * 20] = 0           # 20 kept entries leave ...
        m[500 + i * 20:500 + (i + 1) * 20] = 1  # ... and 20 others enter: 4 % per draw
        stops.append(drift.put(m))
    assert not any(stops)
    assert max(drift.last_distances) == pytest.approx(0.16)
