"""apb_sparse.methods.radmm (ADMM schedule, RADMM): behaviours of the authors' code (see docs/methods.md)."""
from __future__ import annotations

from apb_sparse import methods
from apb_sparse.methods.radmm import admm_phase_epochs, admm_schedule
from methods_fixtures import QUICK, _fresh_model
from methods_fixtures import _digits as _data


def test_admm_schedule_guarantees_the_minimum_updates():
    assert admm_schedule(60, 9, 4, 10) == (5, 10)         # quick preset, lengthened to 5 epochs
    assert admm_schedule(7820, 9, 4, 10) == (9, 782)      # CIFAR, 20 epochs
    assert admm_schedule(12, 9, 4, 10) == (0, 0)          # too short: the caller lengthens
    assert admm_phase_epochs(1, 12, 4, 10) == 5           # 50 steps needed
    assert admm_phase_epochs(1, 79, 4, 10) == 1
    assert admm_phase_epochs(0, 12, 4, 10) == 0


def test_radmm_runs_several_dual_updates_with_one_prune_epoch():
    # The update count does not depend on the loss: natural training keeps the test fast.
    res = methods.RADMM().prune(_fresh_model(8), _data(), sparsity=0.8,
                                recipe=QUICK.replace(mode="natural"), pretrained=True)
    assert res.log["admm_epochs_requested"] == 1 and res.log["admm_epochs"] == 5
    assert res.log["admm_updates"] >= 4
    assert res.log["admm_updates"] == res.log["admm_planned_updates"]
    assert res.log["admm_residual"] < 0.5
