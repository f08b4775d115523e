"""apb_sparse.methods.pwoa (PwoA): behaviours of the authors' code (see docs/methods.md)."""
from __future__ import annotations

import copy
import math

import torch

from apb_sparse import methods
from apb_sparse.methods.base import local_masks
from apb_sparse.methods.pwoa import PwoA, hidden_modules
from apb_sparse.nn import masked_layers, to_masked
from methods_fixtures import QUICK, _fresh_model
from methods_fixtures import _digits as _data


def test_pwoa_runs_its_admm_updates_with_one_prune_epoch():
    res = methods.PwoA().prune(_fresh_model(8), _data(), sparsity=0.8, recipe=QUICK, pretrained=True)
    assert res.log["admm_updates"] >= 4



def test_pwoa_hsic_gradient_is_a_meaningful_fraction_of_distillation():
    torch.manual_seed(0)
    teacher = to_masked(_fresh_model()).eval()
    student = copy.deepcopy(teacher).train()
    layers = [l for _, l in masked_layers(student)]
    for l, m in zip(layers, local_masks([l.weight.detach().abs() for l in layers], 0.9)):
        l.set_mask(m)
    x, y = _data().tensors("train", n_samples=64)
    loss = PwoA().loss(student, teacher, layers[-1])
    try:
        t = loss.terms(student, x, y)
    finally:
        loss.remove()
    assert t["n_hidden"] == 5   # four conv-BN-ReLU stages and the classifier's input
    ws = [l.weight for l in layers]
    g_kd = torch.autograd.grad(t["kd"], ws, retain_graph=True)
    g_h = [g for g in torch.autograd.grad(t["hsic"], ws, allow_unused=True) if g is not None]
    norm = lambda gs: math.sqrt(sum(float((g ** 2).sum()) for g in gs))
    ratio = norm(g_h) / norm(g_kd)
    assert ratio > 0.05, ratio


def test_pwoa_hidden_representations_are_block_outputs():
    from apb_sparse.models import get_model

    model = get_model("resnet18", num_classes=10)
    mods = hidden_modules(model)
    # stem ReLU + 8 residual blocks (the classifier input is added by the loss)
    assert len(mods) == 9
    assert sum(hasattr(m, "shortcut") for m in mods) == 8
