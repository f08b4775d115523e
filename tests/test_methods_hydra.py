"""apb_sparse.methods.hydra (HYDRA): behaviours of the authors' code (see docs/methods.md)."""
from __future__ import annotations

import torch
from torch import nn

from apb_sparse import methods
from apb_sparse.nn import masked_layers
from methods_fixtures import QUICK, _fresh_model
from methods_fixtures import _digits as _data


def test_hydra_trains_batchnorm_during_score_learning():
    base = _fresh_model(8)
    recipe = QUICK.replace(mode="natural")
    res = methods.HYDRA().prune(base, _data(), sparsity=0.8, recipe=recipe, pretrained=True)
    bns_new = [m for m in res.model.modules() if isinstance(m, nn.BatchNorm2d)]
    bns_old = [m for m in base.modules() if isinstance(m, nn.BatchNorm2d)]
    moved = sum(float((a.weight - b.weight).detach().abs().sum() + (a.bias - b.bias).detach().abs().sum())
                for a, b in zip(bns_new, bns_old))
    assert moved > 1e-3
    assert any(not torch.equal(a.running_mean, b.running_mean) for a, b in zip(bns_new, bns_old))
    # conv / linear weights stay frozen: kept weights equal the dense ones
    for (_, l), w in zip(masked_layers(res.model), [m.weight for m in base.modules()
                                                     if isinstance(m, (nn.Conv2d, nn.Linear))]):
        keep = l.weight_mask.bool()
        assert torch.equal(l.weight[keep], w.detach()[keep])


def test_hydra_can_freeze_batchnorm_on_request():
    base = _fresh_model(8)
    recipe = QUICK.replace(mode="natural")
    res = methods.HYDRA(train_bn=False).prune(base, _data(), sparsity=0.8, recipe=recipe,
                                              pretrained=True)
    for a, b in zip([m for m in res.model.modules() if isinstance(m, nn.BatchNorm2d)],
                    [m for m in base.modules() if isinstance(m, nn.BatchNorm2d)]):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
