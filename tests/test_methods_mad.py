"""apb_sparse.methods.mad (MAD, K-FAC damage): behaviours of the authors' code (see docs/methods.md)."""
from __future__ import annotations

import math

import torch
from torch import nn

from apb_sparse import methods
from apb_sparse.methods.mad import MAD, kfac_damage
from apb_sparse.nn import MaskedLinear, to_masked
from methods_fixtures import QUICK, _fresh_model
from methods_fixtures import _digits as _data


def test_kfac_damage_of_a_1x1_conv_equals_the_linear_layer():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    conv = nn.Conv2d(6, 4, 1)
    a = torch.randn(5, 6)
    g = torch.randn(5, 4)
    dw = torch.randn(4, 7)
    d_lin = kfac_damage(lin, a, g, dw, 5)
    d_conv = kfac_damage(conv, a[:, :, None, None], g[:, :, None, None], dw, 5)
    torch.testing.assert_close(d_conv, d_lin)
    # the row sums are the row-block quadratic form 0.5 * G_ii * dw_i^T A dw_i
    x = torch.cat([a, torch.ones(5, 1)], 1)
    A = x.t() @ x / 5
    G = 5 * (g ** 2).sum(0)
    torch.testing.assert_close(d_lin.sum(1), 0.5 * G * torch.einsum("ij,jk,ik->i", dw, A, dw))


def test_kfac_damage_of_a_grouped_conv_is_per_group():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False)
    a = torch.randn(3, 4, 5, 5)
    g = torch.randn(3, 6, 5, 5)
    dw = torch.randn(6, 2 * 9)
    d = kfac_damage(conv, a, g, dw, 3)
    for gi in range(2):
        sub = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        rows = slice(3 * gi, 3 * gi + 3)
        torch.testing.assert_close(d[rows], kfac_damage(sub, a[:, 2 * gi:2 * gi + 2], g[:, rows], dw[rows], 3))


def _mad_ctx(n_batches=2, **kw):
    model = to_masked(_fresh_model(8))
    method = MAD(n_batches=n_batches, **kw)
    ctx = methods.PruneContext(method, model, _data(), 0.9, "unstructured", QUICK, True)
    return method, ctx


def test_mad_saliency_is_the_damage_of_the_learned_soft_mask():
    torch.manual_seed(0)
    method, ctx = _mad_ctx(mask_steps=0)
    assert all(float(d.abs().sum()) == 0 for d in method.saliency(ctx))  # mask never moved: dW = 0
    method, ctx = _mad_ctx(mask_steps=5)
    damage = method.saliency(ctx)
    assert ctx.log["saliency_batches"] == 2
    assert all(float(d.abs().sum()) > 0 for d in damage)
    # weights whose soft mask stayed at 1 in every batch (dW = 0 row entries) may still carry
    # damage through the cross terms; but a zero weight never moves the loss:
    layer = ctx.layers[0]
    with torch.no_grad():
        layer.weight[0].zero_()
    assert float(method.saliency(ctx)[0][0].abs().sum()) == 0


def test_mad_prunes_convs_globally_and_the_classifier_row_wise():
    torch.manual_seed(0)
    method, ctx = _mad_ctx()
    g = torch.Generator().manual_seed(0)
    damage = [torch.rand(l.weight.shape, generator=g) for l in ctx.layers]
    damage[0] += 100   # the first conv's damage dominates: a global rule keeps it dense
    masks = method.masks_from_saliency(ctx, damage)
    n = sum(l.weight.numel() for l in ctx.layers)
    assert int(sum(m.sum() for m in masks)) == round(0.1 * n)
    assert int(masks[0].sum()) == masks[0].numel()
    cls = masks[-1]
    assert isinstance(ctx.layers[-1], MaskedLinear)
    per_row = cls.sum(1)
    fan_in = ctx.layers[-1].weight.shape[1]
    assert torch.all(per_row == per_row[0]) and int(per_row[0]) == fan_in - math.floor(0.9 * fan_in)
