"""Pruning methods on sklearn digits with tiny budgets (small_cnn, one epoch per phase, PGD-2).

Every method runs end to end once per (structure, sparsity) case; the runs are cached per module
so the behavioural checks below share them. Seeds are fixed and everything runs on CPU, so the
accuracy thresholds are deterministic; they sit well below the measured values (see the report
in benchmarks/methods_digits.py) and well above chance (0.1).
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import apb_sparse
from apb_sparse import methods
from apb_sparse.data import get_dataset
from apb_sparse.methods.base import (following_batchnorms, global_masks, largest_remainder,
                                     local_masks, topk_mask, unit_masks_global, unit_masks_local)
from apb_sparse.methods.flyingbird import erk_keep
from apb_sparse.nn import MaskedConv2d, masked_layers
from apb_sparse.robustness import pgd

ALL = ["flyingbird", "harp", "hydra", "li20", "lwm_global", "lwm_local", "mad", "pwoa", "radmm",
       "random", "robustbird", "rst", "twinrep"]
STRUCTURED = ["harp", "lwm_local", "pwoa", "radmm", "twinrep"]
EPS = 0.1

RECIPE = methods.Recipe(arch="small_cnn", dataset="digits", eps=EPS, steps=2, pretrain_epochs=1,
                        prune_epochs=1, finetune_epochs=1, batch_size=64, lr=0.1,
                        finetune_lr=0.05, seed=0)


@functools.lru_cache(maxsize=None)
def _data():
    return get_dataset("digits")


@functools.lru_cache(maxsize=None)
def _pretrained():
    """A dense small_cnn adversarially trained for 3 epochs, shared by the pipeline-A methods."""
    from apb_sparse.train import train

    torch.manual_seed(0)
    model = RECIPE.build_model(_data())
    train(model, _data(), RECIPE.train_config(3), progress=False)
    return model


@functools.lru_cache(maxsize=None)
def _run(name: str, structure: str, sparsity: float):
    cls = methods.get(name)
    if cls.tags.pipeline == "A":
        return cls().prune(_pretrained(), _data(), sparsity=sparsity, structure=structure,
                           recipe=RECIPE, pretrained=True)
    # B / D methods start from scratch and spend the whole budget (3 epochs). TwinRep gets 4
    # epochs per phase: with both reparameterisation factors drawn at random (the authors' init)
    # its effective weights start near 1/fan_in, and 3 (unstructured) or 6 (filters: clean 0.23-0.83
    # across seeds and runs) epochs do not train it reliably; 12 reached 0.91-0.94 (docs/methods.md).
    recipe = RECIPE.replace(pretrain_epochs=4, prune_epochs=4, finetune_epochs=4) \
        if name == "twinrep" else RECIPE
    return cls().prune(None, _data(), sparsity=sparsity, structure=structure, recipe=recipe)


def _pgd_acc(model, eps=EPS):
    x, y = _data().tensors("test")
    model.eval()
    xa = pgd(model, x, y, norm="Linf", eps=eps, steps=5)
    with torch.no_grad():
        return float((model(xa).argmax(1) == y).float().mean())


def _clean_acc(model):
    x, y = _data().tensors("test")
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


CASES = [(n, "unstructured", 0.9) for n in ALL] + [(n, "filter", 0.5) for n in STRUCTURED]


def _ids(case):
    return f"{case[0]}-{case[1]}-{case[2]}"


# ------------------------------------------------------------------------------- registry
def test_registry_lists_every_method():
    assert methods.available() == sorted(ALL)
    for name in ALL:
        cls = methods.get(name)
        assert issubclass(cls, methods.PruningMethod) and cls.name == name
        assert cls.tags.pipeline in ("A", "B", "D")
    assert methods.get("HYDRA") is methods.HYDRA
    with pytest.raises(ValueError, match="unknown pruning method"):
        methods.get("nope")


def test_structured_support_matches_the_issue():
    for name in STRUCTURED:
        assert "filter" in methods.get(name).structures
    for name in ["hydra", "rst", "mad", "li20", "robustbird", "flyingbird", "lwm_global"]:
        assert methods.get(name).structures == ("unstructured",)


def test_bad_arguments_raise():
    m = methods.get("lwm_local")()
    with pytest.raises(ValueError, match="sparsity"):
        m.prune(None, _data(), sparsity=1.0, recipe=RECIPE)
    with pytest.raises(ValueError, match="structure"):
        methods.get("hydra")().prune(None, _data(), sparsity=0.5, structure="filter", recipe=RECIPE)
    with pytest.raises(ValueError, match="structure"):
        m.prune(None, _data(), sparsity=0.5, structure="kernel", recipe=RECIPE)
    with pytest.raises(TypeError, match="model"):
        m.prune("resnet", _data(), sparsity=0.5, recipe=RECIPE)
    with pytest.raises(ValueError, match="pretrain_epochs"):
        methods.Recipe(pretrain_epochs=-1)


def test_recipe_carries_every_train_config_field():
    from dataclasses import asdict

    from apb_sparse.train import TrainConfig

    default = asdict(TrainConfig(epochs=3))
    assert asdict(methods.Recipe().train_config(3)) == default
    changed = dict(mode="trades", batch_size=64, lr=0.05, momentum=0.8, weight_decay=1e-4,
                   optimizer="adam", scheduler="step", norm="L2", eps=0.5, alpha=0.1, steps=3,
                   trades_beta=1.0, seed=7)
    assert set(changed) == set(default) - {"epochs"}, "a TrainConfig field is missing from this test"
    config = methods.Recipe(**changed).train_config(2, lr=0.2)
    assert asdict(config) == {**changed, "epochs": 2, "lr": 0.2}


def test_the_old_import_path_still_names_everything():
    from apb_sparse.methods import base, context, masks, recipe, registry, structure, tags

    for name in base.__all__:
        obj = getattr(base, name)
        homes = [m for m in (context, masks, recipe, registry, structure, tags) if getattr(m, name, None) is obj]
        assert homes or name in ("PruningMethod", "reinitialize_"), name


# ------------------------------------------------------------------------------- trained runs
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_runs_hit_sparsity_and_keep_zeros(case):
    name, structure, sparsity = case
    res = _run(*case)
    model = res.model
    layers = [l for _, l in masked_layers(model)]
    assert layers and all(l.mask_fn is None for l in layers)
    for l in layers:
        assert set(torch.unique(l.weight_mask).tolist()) <= {0.0, 1.0}
        assert torch.all(l.weight[l.weight_mask == 0] == 0)
    report = apb_sparse.sparsity_report(model)
    n = report.numel
    if structure == "unstructured":
        assert abs(res.log["sparsity"] - sparsity) <= 1.0 / n
        assert abs(report.sparsity - sparsity) <= 1.0 / n + 1e-3  # trained weights may hit 0.0 too
    else:
        convs = [l for l in layers if isinstance(l, MaskedConv2d)]
        tol = sum(l.weight[0].numel() for l in convs) / sum(l.weight.numel() for l in convs)
        assert abs(res.log["sparsity"] - sparsity) <= tol
    assert res.log["method"] == name and res.log["phases"]


@functools.lru_cache(maxsize=None)
def _run_mad_diagonal():
    """MAD with the diagonal of its K-FAC input covariance (``cross_terms=False``).

    The authors' full K-FAC damage couples each weight's sign to its row's (the uncentred
    covariance of post-ReLU inputs is all positive), and on small_cnn / digits the resulting
    masks do not recover within this file's one-epoch finetuning (docs/methods.md, MAD); the
    end-to-end accuracy check of the MAD pipeline therefore uses the diagonal variant.
    """
    return methods.MAD(cross_terms=False).prune(_pretrained(), _data(), sparsity=0.9,
                                                recipe=RECIPE, pretrained=True)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_runs_are_robust_above_chance(case):
    name = case[0]
    model = (_run_mad_diagonal() if name == "mad" else _run(*case)).model
    clean, robust = _clean_acc(model), _pgd_acc(model)
    floor = 0.3
    assert clean > 0.6, (name, clean)
    assert robust > floor, (name, robust)


@pytest.mark.parametrize("name", STRUCTURED)
def test_structured_masks_are_whole_filters_and_compact_removes_them(name):
    res = _run(name, "filter", 0.5)
    model = res.model.eval()
    bn_of = following_batchnorms(model, torch.zeros(2, 1, 8, 8))
    pruned_filters = 0
    for _, l in masked_layers(model):
        rows = l.weight_mask.flatten(1)
        if isinstance(l, MaskedConv2d):
            assert torch.all((rows.amin(1) == rows.amax(1))), "mask rows must be all-0 or all-1"
            dead = rows.amax(1) == 0
            pruned_filters += int(dead.sum())
            bn = bn_of[l]
            assert torch.all(bn.weight[dead] == 0) and torch.all(bn.bias[dead] == 0)
        else:
            assert torch.all(l.weight_mask == 1), "linear layers stay dense in structured mode"
    assert pruned_filters > 0
    x, _ = _data().tensors("test", n_samples=64)
    small = apb_sparse.compact(model, x[:2])
    removed = sum(small.apb_compact_removed.values())
    assert removed == pruned_filters
    n_small = sum(p.numel() for p in small.parameters())
    n_big = sum(p.numel() for p in model.parameters())
    assert n_small < n_big
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["hydra", "rst", "harp"])
def test_score_methods_move_their_scores(name):
    log = _run(name, "unstructured", 0.9).log
    assert log["score_change"] > 1e-3
    if "mask_change" in log:
        assert log["mask_change"] > 0


def test_harp_structured_learns_layer_rates():
    log = _run("harp", "filter", 0.5).log
    assert log["rate_change"] > 0
    assert len(log["layer_density_learned"]) == 4


def test_flyingbird_keeps_sparsity_constant_through_updates():
    res = _run("flyingbird", "unstructured", 0.9)
    updates = res.log["updates"]
    assert len(updates) >= 3
    n = sum(l.weight.numel() for _, l in masked_layers(res.model))
    expected = round(0.1 * n)
    assert all(u["kept"] == expected for u in updates)
    assert sum(u["moved"] for u in updates) > 0
    rates = [u["death_rate"] for u in updates]
    assert rates == sorted(rates, reverse=True) and rates[0] <= 0.5


def test_twinrep_prunes_once_during_training():
    log = _run("twinrep", "unstructured", 0.9).log
    assert log["prune_step"] == 23  # end of epoch 1 of 3 (1437 samples / 64 per batch)


def test_radmm_brings_weights_near_the_sparse_set():
    log = _run("radmm", "unstructured", 0.9).log
    assert log["admm_updates"] >= 4 and log["admm_residual"] < 0.5


# ------------------------------------------------------------------------------- exactness (no training)
ZERO = RECIPE.replace(pretrain_epochs=0, prune_epochs=0, finetune_epochs=0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("sparsity", [0.95, 0.99])
def test_mask_construction_is_exact_without_training(name, sparsity):
    res = methods.get(name)().prune(None, _data(), sparsity=sparsity, recipe=ZERO)
    n = sum(l.weight.numel() for _, l in masked_layers(res.model))
    kept = sum(int(l.weight_mask.sum()) for _, l in masked_layers(res.model))
    assert kept == round((1 - sparsity) * n)
    assert all(int(l.weight_mask.sum()) >= 1 for _, l in masked_layers(res.model))


@pytest.mark.parametrize("name", STRUCTURED)
@pytest.mark.parametrize("sparsity", [0.75, 0.9])
def test_structured_construction_without_training(name, sparsity):
    res = methods.get(name)().prune(None, _data(), sparsity=sparsity, structure="filter", recipe=ZERO)
    convs = [l for _, l in masked_layers(res.model) if isinstance(l, MaskedConv2d)]
    tol = sum(l.weight[0].numel() for l in convs) / sum(l.weight.numel() for l in convs)
    assert abs(res.log["sparsity"] - sparsity) <= tol
    for l in convs:
        rows = l.weight_mask.flatten(1)
        assert torch.all(rows.amin(1) == rows.amax(1)) and rows.amax(1).sum() >= 1


def test_prune_does_not_modify_the_given_model_and_bd_reinitialise_pretrained():
    base = _pretrained()
    before = copy.deepcopy(base.state_dict())
    methods.get("lwm_local")().prune(base, _data(), sparsity=0.5, recipe=ZERO, pretrained=True)
    res = methods.get("rst")().prune(base, _data(), sparsity=0.5, recipe=ZERO, pretrained=True)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    # RST's weights are a fresh initialisation, not the pretrained ones.
    w_new = res.model.features[0].weight
    w_old = base.features[0].weight
    kept = res.model.features[0].weight_mask.bool()
    assert not torch.allclose(w_new[kept], w_old[kept])


def test_same_seed_same_masks():
    a = methods.get("random")().prune(None, _data(), sparsity=0.9, recipe=ZERO).model
    b = methods.get("random")().prune(None, _data(), sparsity=0.9, recipe=ZERO).model
    for (_, la), (_, lb) in zip(masked_layers(a), masked_layers(b)):
        assert torch.equal(la.weight_mask, lb.weight_mask)


# ------------------------------------------------------------------------------- helpers
def test_topk_mask_breaks_ties_by_position():
    s = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5])
    assert topk_mask(s, 2).tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert topk_mask(s, 0).sum() == 0 and topk_mask(s, 9).sum() == 5


def test_local_and_global_masks_are_exact():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(7, 3, generator=g), torch.rand(50, generator=g), torch.rand(3, generator=g)]
    n = sum(s.numel() for s in scores)
    for sp in (0.0, 0.3, 0.9, 0.99):
        for masks in (local_masks(scores, sp), global_masks(scores, sp)):
            assert int(sum(m.sum() for m in masks)) == max(round((1 - sp) * n), 3)
            assert all(m.sum() >= 1 for m in masks)
    # Global: a layer with tiny scores still keeps min_keep entries.
    tiny = [torch.full((10,), 1e-6), torch.rand(100, generator=g)]
    masks = global_masks(tiny, 0.9, min_keep=2)
    assert int(masks[0].sum()) == 2 and int(sum(m.sum() for m in masks)) == 11


def test_largest_remainder_respects_bounds_and_total():
    k = largest_remainder([1.5, 2.5, 0.2], 4, [1, 1, 1], [3, 3, 3])
    assert sum(k) == 4 and all(1 <= v <= 3 for v in k)
    with pytest.raises(ValueError):
        largest_remainder([1.0], 5, [0], [3])


def test_unit_masks_within_one_filter():
    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(16, generator=g), torch.rand(32, generator=g)]
    sizes = [9, 144]
    total = 16 * 9 + 32 * 144
    for fn in (unit_masks_local, unit_masks_global):
        masks = fn(scores, sizes, 0.5)
        kept = sum(float(m.sum()) * z for m, z in zip(masks, sizes))
        assert abs(kept - 0.5 * total) <= max(sizes)


def test_erk_keep_is_exact():
    model = methods.Recipe(arch="small_cnn").build_model(_data())
    model = apb_sparse.nn.to_masked(model)
    layers = [l for _, l in masked_layers(model)]
    n = sum(l.weight.numel() for l in layers)
    keep = erk_keep(layers, 0.9)
    assert sum(keep) == round(0.1 * n)
    assert all(1 <= k <= l.weight.numel() for k, l in zip(keep, layers))


def test_taxonomy_tags_validate():
    with pytest.raises(ValueError):
        methods.TaxonomyTags("A", ("AT",), "1S", ("US",), None, ("L",), "LWM")
    with pytest.raises(ValueError):
        methods.TaxonomyTags("D", ("AT",), "1S", ("US",), None, ("L",), "LWM")
    with pytest.raises(ValueError):
        methods.TaxonomyTags("B", ("AT", "AT"), "1S", ("US",), None, ("L",), "XYZ")
