"""apb_sparse.methods.rst (RST): behaviours of the authors' code (see docs/methods.md)."""
from __future__ import annotations

import math

import torch

from apb_sparse.methods.rst import RST
from apb_sparse.nn import masked_layers
from methods_fixtures import QUICK
from methods_fixtures import _digits as _data


def test_rst_weights_are_signed_constants_scaled_by_fan_in():
    zero = QUICK.replace(prune_epochs=0)
    res = RST().prune(None, _data(), sparsity=0.5, recipe=zero)
    for _, l in masked_layers(res.model):
        kept = l.weight[l.weight_mask.bool()].abs()
        std = math.sqrt(2.0 / l.weight[0].numel())
        assert torch.allclose(kept, torch.full_like(kept, std)), type(l).__name__
        if l.bias is not None:
            assert torch.all(l.bias == 0)
    signs = torch.cat([torch.sign(l.weight[l.weight_mask.bool()]) for _, l in masked_layers(res.model)])
    assert 0.3 < float((signs > 0).float().mean()) < 0.7
