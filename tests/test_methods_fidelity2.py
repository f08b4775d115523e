"""Fidelity of PwoA, MAD, HYDRA, RADMM, RST and the shared score-mask cache (issue 11, part 2).

Each test checks a behaviour of the authors' code that an earlier version did not have (see
docs/methods.md); all run on sklearn digits / tiny tensors in a few seconds.
"""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn

from apb_sparse import methods
from apb_sparse.data import get_dataset
from apb_sparse.methods.base import cached_ste_topk, local_masks, topk_mask
from apb_sparse.methods.mad import MAD, kfac_damage
from apb_sparse.methods.pwoa import PwoA, hidden_modules
from apb_sparse.methods.radmm import admm_phase_epochs, admm_schedule
from apb_sparse.methods.rst import RST
from apb_sparse.nn import MaskedLinear, masked_layers, to_masked

# The quick preset's recipe shape: digits at batch 128 (12 steps per epoch), prune_epochs=1.
QUICK = methods.Recipe(arch="small_cnn", dataset="digits", eps=0.1, steps=2, pretrain_epochs=0,
                       prune_epochs=1, finetune_epochs=0, batch_size=128, lr=0.05,
                       finetune_lr=0.02, seed=0)


@functools.lru_cache(maxsize=None)
def _data():
    return get_dataset("digits")


def _fresh_model(width=None):
    if width is None:
        return QUICK.build_model(_data())
    from apb_sparse.models import get_model

    torch.manual_seed(0)
    return get_model("small_cnn", num_classes=10, in_channels=1, width=width)


# ------------------------------------------------------------------ mask cache
def _score_step_paths():
    paths = ["data_write"]
    try:
        p = nn.Parameter(torch.zeros(2))
        p.grad = torch.ones(2)
        torch.optim.SGD([p], lr=0.1, fused=True).step()
        paths.append("fused_sgd")
    except (RuntimeError, TypeError, NotImplementedError):  # fused SGD not available on this CPU build
        pass
    return paths


@pytest.mark.parametrize("path", _score_step_paths())
def test_mask_follows_scores_updated_without_a_version_bump(path):
    torch.manual_seed(0)
    s = nn.Parameter(torch.randn(50))
    mask_fn = cached_ste_topk(s, lambda: 10)
    first = mask_fn(None).detach().clone()
    assert torch.equal(first, topk_mask(s.detach().abs(), 10))
    version = s._version
    new = torch.randn(50) * 10
    if path == "data_write":
        s.data.copy_(new)
    else:
        s.grad = (s.detach() - new) / 1.0   # one SGD step of lr 1 lands exactly on `new`
        torch.optim.SGD([s], lr=1.0, fused=True).step()
    assert s._version == version, "the update path must be one that does not bump _version"
    assert torch.allclose(s.detach(), new)
    after = mask_fn(None).detach()
    assert torch.equal(after, topk_mask(new.abs(), 10))
    assert not torch.equal(after, first)


def test_mask_cache_still_reuses_the_sort_between_updates(monkeypatch):
    from apb_sparse.methods import masks

    calls = {"n": 0}
    real = masks.topk_mask

    def counting(scores, k):
        calls["n"] += 1
        return real(scores, k)

    monkeypatch.setattr(masks, "topk_mask", counting)
    s = nn.Parameter(torch.randn(30))
    mask_fn = cached_ste_topk(s, lambda: 5)
    for _ in range(5):
        mask_fn(None)
    assert calls["n"] == 1
    with torch.no_grad():
        s.add_(torch.randn(30))
    mask_fn(None)
    assert calls["n"] == 2


# ------------------------------------------------------------------ ADMM budgets
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


def test_pwoa_runs_its_admm_updates_with_one_prune_epoch():
    res = methods.PwoA().prune(_fresh_model(8), _data(), sparsity=0.8, recipe=QUICK, pretrained=True)
    assert res.log["admm_updates"] >= 4


# ------------------------------------------------------------------ PwoA
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


# ------------------------------------------------------------------ HYDRA
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


# ------------------------------------------------------------------ RST
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


# ------------------------------------------------------------------ MAD
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


def test_method_classes_name_their_differences_and_code():
    for name in ("pwoa", "mad", "hydra", "radmm", "rst"):
        cls = methods.get(name)
        assert cls.notes and cls.code_url.startswith("https://github.com/")
