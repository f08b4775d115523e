"""Whole models: sparsify / deploy / compact / densify equal the masked dense model; reports; bad inputs."""
import pytest
import torch
from torch import nn

import apb_sparse
from apb_sparse import compact, densify, magnitude_masks, apply_masks, sparsify, sparsity_report
from apb_sparse.models import get_model
from apb_sparse.nn import ChannelSparseConv2d, SparseConv2d, SparseLinear, to_masked


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = get_model(arch).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


CASES = [("unstructured", 0.9), ("unstructured", 0.95), ("unstructured", 0.99), ("filter", 0.5)]


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(1)
    return torch.rand(2, 3, 32, 32)


@pytest.mark.parametrize("arch", ["resnet18", "vgg16"])
@pytest.mark.parametrize("structure,sparsity", CASES)
def test_sparsify_compact_densify_match_masked_model(arch, structure, sparsity, inputs, tmp_path):
    model = _model(arch)
    masks = magnitude_masks(model, sparsity, structure=structure)
    masked = apply_masks(model, masks)
    if structure == "filter":
        apb_sparse.zero_dead_batchnorm(masked)  # a pruned filter takes its BatchNorm channel along
    with torch.no_grad():
        ref = masked(inputs)
        tol = dict(rtol=1e-4, atol=1e-4 * max(1.0, ref.abs().max().item()))
        sparse = sparsify(masked)
        torch.testing.assert_close(sparse(inputs), ref, **tol)
        report = sparsity_report(sparse, (1, 3, 32, 32))
        assert report.sparsity == pytest.approx(sparsity_report(masked).sparsity, abs=1e-9)
        if structure == "unstructured":
            assert report.sparsity == pytest.approx(sparsity, abs=2e-3)
            assert report.sparse_macs < (1 - sparsity + 0.02) * report.dense_macs
        torch.testing.assert_close(densify(sparse)(inputs), ref, **tol)
        deployed = apb_sparse.deploy(masked, inputs)  # the snapshot: folded, fused, TorchScript
        torch.testing.assert_close(deployed(inputs), ref, **tol)
        torch.testing.assert_close(deployed(inputs[:1]), ref[:1], **tol)  # another signature
        small = compact(sparse)
        torch.testing.assert_close(small(inputs), ref, **tol)
        torch.testing.assert_close(compact(masked)(inputs), ref, **tol)  # from the masked dense model too
        if structure == "filter":
            after = sparsity_report(small, (1, 3, 32, 32)).dense_macs
            assert after < 0.6 * report.dense_macs  # the dead channels are really gone


@pytest.mark.parametrize("arch,structure,sparsity", [("resnet18", "unstructured", 0.9), ("resnet18", "filter", 0.5),
                                                     ("vgg16", "unstructured", 0.95)])
def test_forced_paths_and_state_dict_round_trip(arch, structure, sparsity, inputs, tmp_path):
    model = _model(arch)
    masks = magnitude_masks(model, sparsity, structure=structure)
    masked = apply_masks(model, masks)
    with torch.no_grad():
        ref = masked(inputs)
        tol = dict(rtol=1e-4, atol=1e-4 * max(1.0, ref.abs().max().item()))
        for layout in ("dense", "unstructured", "filter"):
            sparse = sparsify(masked, layout=layout)
            torch.testing.assert_close(sparse(inputs), ref, **tol)
        # state_dict round trip through a file (weights_only load) into a model with other nonzeros
        torch.save(sparse.state_dict(), tmp_path / "m.pt")
        paths = {name: c.layout for name, c in sparse.apb_sparse_choices.items()}
        fresh = sparsify(_model(arch), masks=magnitude_masks(_model(arch), 0.5), layout=paths)
        fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
        torch.testing.assert_close(fresh(inputs), ref, **tol)


def test_sparsify_uses_zeros_masks_and_masked_layers(inputs):
    model = _model("resnet18")
    masks = magnitude_masks(model, 0.95)
    # 1) dense-with-zeros checkpoint, 2) explicit masks, 3) masked training layers: same model
    a = sparsify(apply_masks(model, masks))
    b = sparsify(model, masks)
    masked = to_masked(model)
    apply_masks(masked, masks, inplace=True)
    c = sparsify(masked)
    with torch.no_grad():
        ref = apply_masks(model, masks)(inputs)
        for m in (a, b, c):
            torch.testing.assert_close(m(inputs), ref, rtol=1e-4, atol=1e-5)
    assert all(isinstance(l, (SparseConv2d, SparseLinear)) for n, l in a.named_modules() if n in masks)
    assert set(a.apb_sparse_choices) == set(masks)
    assert not any(isinstance(l, SparseConv2d) for l in model.modules())  # inplace=False left it alone


def test_auto_path_choice_follows_cost():
    torch.manual_seed(0)
    dense = nn.Conv2d(16, 16, 3)
    very_sparse = nn.Conv2d(16, 16, 3)
    channels = nn.Conv2d(16, 16, 3)
    with torch.no_grad():
        very_sparse.weight.mul_(torch.rand_like(very_sparse.weight) > 0.98)
        channels.weight[8:] = 0
        channels.weight[:, 8:] = 0
    model = nn.Sequential(dense, very_sparse, channels)
    out = sparsify(model)
    assert isinstance(out[0], nn.Conv2d) and not isinstance(out[0], (SparseConv2d, ChannelSparseConv2d))
    assert isinstance(out[1], SparseConv2d)
    assert isinstance(out[2], ChannelSparseConv2d)
    assert [c.layout for c in out.apb_sparse_choices.values()] == ["dense", "unstructured", "filter"]


def test_stem_convs_take_the_sparse_path_at_lower_sparsity():
    """Stem convs (<= STEM_TAPS taps per filter) are costed with STEM_EFFICIENCY, wide 3x3 convs with
    SPATIAL_EFFICIENCY, 1x1 convs with UNSTRUCTURED_EFFICIENCY: at the same density a grayscale or RGB
    stem goes sparse, a fully dense one stays a vendor conv, and wide convs stay dense where their
    efficiency makes the sparse layout dearer."""
    from apb_sparse.sparsify import SPATIAL_EFFICIENCY, STEM_EFFICIENCY, STEM_TAPS, UNSTRUCTURED_EFFICIENCY
    assert UNSTRUCTURED_EFFICIENCY < 0.5 < SPATIAL_EFFICIENCY < 0.75 < STEM_EFFICIENCY
    torch.manual_seed(0)
    gray, rgb, full = nn.Conv2d(1, 16, 3), nn.Conv2d(3, 16, 3), nn.Conv2d(3, 16, 3)
    wide_half, wide_most, pointwise = nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(64, 64, 1)
    assert gray.weight[0].numel() <= STEM_TAPS and rgb.weight[0].numel() <= STEM_TAPS < min(wide_half.weight[0].numel(), pointwise.weight[0].numel())
    with torch.no_grad():
        for conv in (gray, rgb, wide_half, pointwise):
            conv.weight.mul_((torch.arange(conv.weight.numel()) % 2).view_as(conv.weight))
        wide_most.weight.mul_((torch.arange(wide_most.weight.numel()) % 4 != 0).view_as(wide_most.weight))
    out = sparsify(nn.Sequential(gray, rgb, full, wide_half, wide_most, pointwise))  # no forward: shapes need not chain
    choices = list(out.apb_sparse_choices.values())
    assert [c.layout for c in choices[:5]] == ["unstructured", "unstructured", "dense", "unstructured", "dense"]
    assert choices[5].layout != "unstructured"
    assert choices[0].cost["unstructured"] == pytest.approx(0.5 / STEM_EFFICIENCY)
    assert choices[3].cost["unstructured"] == pytest.approx(0.5 / SPATIAL_EFFICIENCY)
    assert choices[4].cost["unstructured"] == pytest.approx(0.75 / SPATIAL_EFFICIENCY)
    assert choices[5].cost["unstructured"] == pytest.approx(0.5 / UNSTRUCTURED_EFFICIENCY)


def test_sparse_model_input_gradients_match(inputs):
    model = _model("resnet18")
    masked = apply_masks(model, magnitude_masks(model, 0.9))
    sparse = sparsify(masked)
    x1 = inputs.clone().requires_grad_()
    x2 = inputs.clone().requires_grad_()
    y = torch.tensor([1, 2])
    nn.functional.cross_entropy(masked(x1), y).backward()
    nn.functional.cross_entropy(sparse(x2), y).backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-3, atol=1e-6)


def test_global_masks_and_report_text():
    model = _model("vgg16")
    masks = magnitude_masks(model, 0.95, scope="global")
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == total - round(0.95 * total)
    per_layer = [1 - m.mean().item() for m in masks.values()]
    assert max(per_layer) - min(per_layer) > 0.05  # global magnitude is uneven across layers
    text = str(sparsity_report(sparsify(apply_masks(model, masks)), (1, 3, 32, 32)))
    assert "total" in text and "unstructured" in text


def test_bad_arguments():
    model = _model("vgg16")
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="sparsity must be in"):
            magnitude_masks(model, bad)
    with pytest.raises(ValueError, match="structure"):
        magnitude_masks(model, 0.5, structure="blocks")
    with pytest.raises(ValueError, match="masks has keys"):
        sparsify(model, {"nope": torch.ones(1)})
    with pytest.raises(ValueError, match="mask has shape"):
        sparsify(model, {"classifier": torch.ones(3, 3)})
    with pytest.raises(ValueError, match="layout must be one of"):
        sparsify(model, layout="fast")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sparsify("resnet18")
    with pytest.raises(ValueError, match="4-D"):
        SparseConv2d.from_dense(model.features[0])(torch.rand(32, 32))


def test_coupled_channel_masks_are_fully_removed_by_compact():
    """Per-conv filter masks on ResNet-18 leave residual channel spaces mostly intact (the union of
    the kept filters survives compact); coupled masks drop the same filters across each join, so
    compact removes half of every channel space: about 4x fewer multiply-adds, same outputs."""
    torch.manual_seed(0)
    model = get_model("resnet18").eval()
    dense_macs = apb_sparse.sparsity_report(model, (1, 3, 32, 32)).dense_macs
    ratios = {}
    for coupled in (False, True):
        masks = apb_sparse.magnitude_masks(model, 0.5, structure="filter", coupled=coupled)
        for name, m in masks.items():
            if m.dim() == 4:  # whole filters, half of them
                assert float(m.flatten(1).amax(1).mean()) == pytest.approx(0.5)
        masked = apb_sparse.apply_masks(model, masks)
        apb_sparse.zero_dead_batchnorm(masked)
        small = apb_sparse.compact(masked)
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(small(x), masked(x), rtol=1e-4, atol=1e-5)
        ratios[coupled] = dense_macs / apb_sparse.sparsity_report(small, (1, 3, 32, 32)).dense_macs
    assert ratios[True] > 3.8 and ratios[False] < 3.0
    with pytest.raises(ValueError, match="coupled"):
        apb_sparse.magnitude_masks(model, 0.5, coupled=True)


def test_version_0_2_names_still_work_with_a_warning():
    """`path=` became `layout=`, the "structured" layout "filter", `structure="channels"` "filter":
    the old spellings give the same result (the renamed keywords and attributes warn)."""
    model = _model("resnet18")
    assert all(torch.equal(a, b) for a, b in zip(magnitude_masks(model, 0.5, structure="channels").values(),
                                                  magnitude_masks(model, 0.5, structure="filter").values()))
    masked = apply_masks(model, magnitude_masks(model, 0.5, structure="filter"))
    new = sparsify(masked, layout="filter")
    with pytest.warns(FutureWarning, match="renamed sparsify\\(layout=...\\)"):
        old = sparsify(masked, path="structured")
    layouts = {n: c.layout for n, c in new.apb_sparse_choices.items()}
    assert {n: c.layout for n, c in old.apb_sparse_choices.items()} == layouts
    assert "filter" in layouts.values()
    assert [type(m) for m in old.modules()] == [type(m) for m in new.modules()]
    with pytest.warns(DeprecationWarning, match="LayerChoice.path is renamed"):
        assert next(iter(new.apb_sparse_choices.values())).path == layouts[next(iter(layouts))]
    # Saved per-layer layouts of version 0.2 name the filter layout "structured".
    saved = {n: ("structured" if v == "filter" else v) for n, v in layouts.items()}
    rebuilt = sparsify(masked, layout=saved)
    assert {n: c.layout for n, c in rebuilt.apb_sparse_choices.items()} == layouts
    x = torch.rand(2, 3, 32, 32)
    with pytest.warns(FutureWarning, match="renamed deploy\\(layout=...\\)"):
        d = apb_sparse.deploy(masked.eval(), x, path="dense")
    assert all(c.layout == "dense" for c in d.apb_sparse_choices.values())
    assert sparsity_report(new).layers[1].layout in ("filter", "dense")
