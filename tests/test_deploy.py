"""The two forms: sparsify keeps the model's semantics; deploy returns a frozen, checked snapshot.

Each test reproduces one class of failure the old default (fuse="auto": an fx graph made at
conversion time, caches keyed on tensor versions, a TorchScript trace keyed on a state signature)
had, and checks the dense model's result or a clear error.
"""
import copy
import io
import pickle
import random

import pytest
import torch
from torch import nn

import apb_sparse
from apb_sparse import DeployedModel, apply_masks, compact, deploy, densify, magnitude_masks, sparsify
from apb_sparse.deploy import MAX_TRACES
from apb_sparse.models import get_model

GLOBAL_SCALE = 1.0


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


class Net(nn.Module):
    """A model whose forward reads Python state: a flag, a scalar, a module global, a dict entry."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.head = nn.Linear(c, 5)
        self.flag = False
        self.scale = 1.0
        self.cfg = {"shift": 0.0}

    def forward(self, x):
        out = self.blocks(torch.relu(self.stem(x)))
        if self.flag:
            out = out * 2
        out = out * self.scale * GLOBAL_SCALE + self.cfg["shift"]
        self.last_mean = out.mean()  # an attribute set inside forward
        return self.head(out.mean((2, 3)))


def _net(seed=0, sparsity=0.8):
    torch.manual_seed(seed)
    m = Net().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return apply_masks(m, magnitude_masks(m, sparsity))


def _x(n=2, seed=1):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _same(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# -------------------------------------------------------------------------- sparsify: semantics
def test_sparsify_eval_train_step_eval_sees_new_batchnorm_statistics():
    s = sparsify(_net())
    x = _x()
    with torch.no_grad():
        first = s(x)
    s.train()
    opt = torch.optim.SGD(s.parameters(), lr=0.1)
    nn.functional.cross_entropy(s(_x(8, 2)), torch.arange(8) % 5).backward()
    opt.step()
    s.eval()
    with torch.no_grad():
        second = s(x)
        want = densify(s)(x)  # the dense model of the current state
    assert not torch.allclose(first, second)
    _same(second, want)


def test_sparsify_sees_data_writes_to_weights_and_statistics():
    s = sparsify(_net())
    x = _x()
    with torch.no_grad():
        s(x)
        s.blocks[0].bn1.running_mean.data += 1.0
        stored = s.head.values if hasattr(s.head, "values") else s.head.weight
        stored.data.mul_(3.0)
        _same(s(x), densify(s)(x))


def test_sparsify_keeps_python_state_read_by_forward():
    global GLOBAL_SCALE
    m = _net()
    s = sparsify(m)
    x = _x()
    with torch.no_grad():
        s(x)
        for obj in (m, s):
            obj.flag, obj.scale = True, 0.5
            obj.cfg["shift"] = 0.25
            obj.blocks.append(Block(8).eval())
        s.blocks[2].load_state_dict(m.blocks[2].state_dict())
        GLOBAL_SCALE = 3.0
        try:
            got, want = s(x), m(x)
        finally:
            GLOBAL_SCALE = 1.0
    _same(got, want)
    assert isinstance(s.last_mean, torch.Tensor)


def test_sparsify_runs_container_hooks_and_replaced_blocks():
    m, s = _net(), sparsify(_net())
    seen = []
    s.blocks.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    s.blocks[1] = nn.Identity()
    m.blocks[1] = nn.Identity()
    with torch.no_grad():
        _same(s(_x()), m(_x()))
    assert seen == [torch.Size([2, 8, 8, 8])]


class ItemNet(nn.Module):
    """Data-dependent control flow through .item(), and an in-place op on the caller's input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x.mul_(2)
        out = self.conv(x)
        if out.mean().item() > 0:
            out = -out
        return self.fc(out.mean((2, 3)))


def test_item_in_forward_and_inplace_input_match_the_dense_model_in_both_forms():
    torch.manual_seed(0)
    m = apply_masks(ItemNet().eval(), magnitude_masks(ItemNet(), 0.5))
    s = sparsify(m)
    d = deploy(m, _x())
    pos, neg = torch.full((1, 3, 6, 6), 1.0), torch.full((1, 3, 6, 6), -1.0)
    with torch.no_grad():
        probe = m.conv(pos * 2).mean().item()
    assert (probe > 0) != (m.conv(neg * 2).mean().item() > 0), "the two inputs must take different branches"
    for form in (s, d):
        for x in (pos, neg, pos, neg):
            mine, ref = x.clone(), x.clone()
            with torch.no_grad():
                got, want = form(mine), m(ref)
            _same(got, want)
            torch.testing.assert_close(mine, ref)  # the caller's input was written exactly once
    # The .item() branch makes TorchScript warn: that signature runs the Python graph.
    assert all(v != "traced" for v in d.apb_deploy_info["traces"].values())


# -------------------------------------------------------------------------- deploy: a snapshot
def test_deploy_matches_and_is_a_snapshot_of_the_source():
    m = _net()
    x = _x()
    d = deploy(m, x)
    assert isinstance(d, DeployedModel) and d.apb_deploy_info["fx_graph"]
    assert list(d.apb_deploy_info["traces"].values()) == ["traced"]
    with torch.no_grad():
        want = m(x)
        _same(d(x), want)
        _same(d(_x(5, 3)), m(_x(5, 3)))
        m.blocks[0].bn1.running_mean.add_(1.0)  # changes to the source are not seen
        _same(d(x), want)
    # grad mode (attacks) runs the Python graph and differentiates to the input
    xi = x.clone().requires_grad_()
    d(xi).sum().backward()
    assert xi.grad is not None and xi.grad.abs().sum() > 0


def test_deploy_bounds_its_graphs_per_input_signature():
    d = deploy(_net(), _x())
    with torch.no_grad():
        for n in range(1, 3 * MAX_TRACES):
            d(_x(n))
    assert len(d.__dict__["_scripts"]) == MAX_TRACES


def test_deploy_refuses_training_mode_and_hooks_with_clear_errors():
    m = _net()
    with pytest.raises(ValueError, match="training mode"):
        deploy(m.train(), _x())
    m.eval()
    h = m.blocks.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="forward hooks on \\['blocks'\\]"):
        deploy(m, _x())
    h.remove()
    d = deploy(m, _x())
    with pytest.raises(RuntimeError, match="inference snapshot"):
        d.train()
    with pytest.raises(TypeError, match="example_input"):
        deploy(m, [1, 2])
    with pytest.raises(TypeError, match="already deployed"):
        deploy(d, _x())


def test_deploy_check_compares_non_finite_outputs_position_by_position():
    from apb_sparse.convert.deploy import _check_close

    want = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    _check_close(want, want.clone())  # NaN equals NaN, an infinity the same infinity
    for bad in (torch.tensor([1.0, 0.0, float("inf"), -float("inf")]),
                torch.tensor([1.0, float("nan"), -float("inf"), -float("inf")]),
                torch.tensor([1.1, float("nan"), float("inf"), -float("inf")])):
        with pytest.raises(RuntimeError, match="differs from the model"):
            _check_close(want, bad)
    _check_close(want.double(), want.double() + 1e-12)  # float64 compared in float64


def test_deploy_copies_and_pickles(tmp_path):
    m, x = _net(), _x()
    d = deploy(m, x)
    with torch.no_grad():
        want = d(x)
        _same(copy.deepcopy(d)(x), want)
        buf = io.BytesIO()
        torch.save(d, buf)
        buf.seek(0)
        _same(torch.load(buf, weights_only=False)(x), want)
        _same(pickle.loads(pickle.dumps(d))(x), want)


def test_deploy_keeps_the_paths_of_a_sparsified_model():
    m = get_model("resnet18").eval()
    m = apply_masks(m, magnitude_masks(m, 0.9))
    s = sparsify(m, layout="filter")
    x = torch.rand(1, 3, 32, 32)
    d = deploy(s, x)
    assert {n: c.layout for n, c in d.apb_sparse_choices.items()} == {n: c.layout for n, c in s.apb_sparse_choices.items()}
    with torch.no_grad():
        _same(d(x), m(x), 1e-4)


# -------------------------------------------------------------------------- export
@pytest.mark.parametrize("form", ["sparsify", "deploy"])
def test_torch_export_and_compile_fullgraph(form):
    m, x = _net(), _x()
    model = sparsify(m) if form == "sparsify" else deploy(m, x)
    with torch.no_grad():
        want = m(x)
        ep = torch.export.export(model, (x,))
        _same(ep.module()(x), want)
        _same(torch.compile(model, fullgraph=True, backend="eager")(x), want)


@pytest.mark.parametrize("sparse_initializers", [False, True])
def test_export_onnx_runs_in_onnxruntime(tmp_path, sparse_initializers):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    m = get_model("resnet18").eval()
    m = apply_masks(m, magnitude_masks(m, 0.9))
    x = torch.rand(2, 3, 32, 32)
    info = apb_sparse.export_onnx(deploy(m, x), x, tmp_path / "m.onnx", sparse_initializers=sparse_initializers)
    dense_bytes = sum(p.numel() * 4 for p in m.parameters())
    if sparse_initializers:
        assert len(info["sparse_initializers"]) >= 20 and info["bytes"] < 0.3 * dense_bytes
    else:
        assert info["bytes"] > 0.9 * dense_bytes  # the zeros are kept
    sess = ort.InferenceSession(info["path"])
    for batch in (x, torch.rand(3, 3, 32, 32)):
        got = torch.from_numpy(sess.run(None, {"input": batch.numpy()})[0])
        with torch.no_grad():
            _same(got, m(batch), 1e-4)
    with pytest.raises(ValueError, match="training mode"):
        apb_sparse.export_onnx(m.train(), x, tmp_path / "t.onnx")


# -------------------------------------------------------------------------- models from the ecosystem
class MyBatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d layout: batch_norm, then self.drop, then self.act."""

    def __init__(self, c):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                     self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class BnActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.b1 = MyBatchNormAct2d(16)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1, bias=False)
        self.b2 = MyBatchNormAct2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.b2(self.c2(self.b1(self.c1(x))))), 1))


def test_batchnorm_act_subclass_folds_fuses_and_compacts():
    torch.manual_seed(0)
    m = BnActNet().eval()
    masks = magnitude_masks(m, 0.5, structure="filter")
    m = apply_masks(m, masks)
    apb_sparse.zero_dead_batchnorm(m)
    x = torch.rand(2, 3, 8, 8)
    d = deploy(m, x, layout="unstructured")
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in d.modules())
    assert sum(getattr(mod, "fused_relu", False) for mod in d.modules()) == 2
    small = compact(m, x)
    assert small.c1.out_channels == 8 and small.c2.out_channels == 4
    with torch.no_grad():
        _same(d(x), m(x))
        _same(small(x), m(x))


def test_timm_batchnorm_act_model_compacts():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    m = timm.create_model("resnet10t", num_classes=10, norm_layer=BatchNormAct2d, act_layer=nn.Identity).eval()
    assert any(isinstance(mod, BatchNormAct2d) for mod in m.modules())
    m = apply_masks(m, magnitude_masks(m, 0.5, structure="filter", coupled=True,
                                       example_input=torch.rand(1, 3, 32, 32)))
    apb_sparse.zero_dead_batchnorm(m)
    x = torch.rand(2, 3, 32, 32)
    small = compact(m, x)
    assert sum(small.apb_compact_removed.values()) > 0
    d = deploy(m, x)
    assert not any(isinstance(mod, BatchNormAct2d) for mod in d.modules())
    with torch.no_grad():
        _same(small(x), m(x), 1e-4)
        _same(d(x), m(x), 1e-4)


class StdConv2d(nn.Conv2d):
    """Weight standardisation (BiT, NF-ResNet): the forward computes with a transformed weight."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def test_weight_standardised_conv_is_reported_and_kept_dense():
    torch.manual_seed(0)
    m = nn.Sequential(StdConv2d(3, 8, 3), nn.ReLU()).eval()
    with torch.no_grad():
        m[0].weight.mul_((torch.rand_like(m[0].weight) > 0.9).float())
    s = sparsify(m)
    assert s.apb_sparse_choices["0"].layout == "dense" and s.apb_sparse_choices["0"].density == 1.0
    assert "overrides forward" in s.apb_sparse_choices["0"].reason
    assert apb_sparse.sparsity_report(m).sparsity == 0.0
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        _same(deploy(m, x)(x), m(x))


def test_torch_prune_models_compact_sparsify_and_deploy():
    from torch.nn.utils import prune

    torch.manual_seed(0)
    m = BnActNet().eval()
    prune.ln_structured(m.c1, "weight", amount=0.5, n=2, dim=0)
    prune.l1_unstructured(m.c2, "weight", amount=0.7)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        want = m(x)
        small = compact(m, x)
        assert small.c1.out_channels < 16 or small.apb_compact_removed == {}
        _same(small(x), want)
        s = sparsify(m)
        assert s.apb_sparse_choices["c2"].density == pytest.approx(0.3, abs=0.01)
        _same(s(x), want)
        _same(deploy(m, x)(x), want)


def test_coupled_masks_take_example_input():
    m = get_model("resnet18").eval()
    a = magnitude_masks(m, 0.5, structure="filter", coupled=True, example_input=torch.rand(1, 3, 32, 32))
    b = magnitude_masks(m, 0.5, structure="filter", coupled=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="only used with coupled=True"):
        magnitude_masks(m, 0.5, example_input=torch.rand(1, 3, 32, 32))


def test_deprecated_switches_warn():
    m = _net()
    with pytest.warns(FutureWarning, match="deploy"):
        s = sparsify(m, fuse="auto")
    assert type(s).forward is Net.forward and "forward" not in s.__dict__
    with pytest.warns(DeprecationWarning, match="calibrate"):
        sparsify(m, calibrate=_x())
    with pytest.warns(FutureWarning):
        assert apb_sparse.fuse.has_eval_fusions(s) is False


def test_random_draw_in_forward_follows_the_seed():
    class Noisy(Net):
        def forward(self, x):
            return super().forward(x) + random.random()

    torch.manual_seed(0)
    m = Noisy().eval()
    s = sparsify(m)
    with torch.no_grad():
        random.seed(3)
        a = s(_x())
        random.seed(3)
        b = m(_x())
    _same(a, b)


def test_deploy_swaps_2x2_max_pools_for_the_fast_form_with_the_same_values():
    """nn.MaxPool2d(2, 2) becomes MaxPool2x2 in the snapshot (other pools stay): identical values,
    odd maps drop the last row / column, NaN propagates; gradients (grad mode) match the source's
    max_pool2d routing exactly; densify / export give a plain nn.MaxPool2d back."""
    from apb_sparse.nn import MaxPool2x2

    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2), nn.MaxPool2d(2)).eval()
    for h, w in ((16, 16), (19, 21)):
        x = torch.randn(4, 3, h, w)
        d = deploy(m, x)
        assert d.apb_deploy_info["fast_pools"] == ["2", "6"]
        kinds = [type(mod) for mod in d.module.modules()]
        assert kinds.count(MaxPool2x2) == 2 and nn.MaxPool2d in kinds  # the 3x3 pool is untouched
        with torch.no_grad():
            assert torch.equal(d(x), m(x))
    pool, ref_pool = MaxPool2x2(), nn.MaxPool2d(2, 2)
    # odd maps, even contiguous maps (4-d and 3-d), a non-contiguous even map; float32 / float64 take
    # the extension's op, bfloat16 the two-maxima route
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for x in (torch.randn(2, 3, 7, 9), torch.randn(2, 3, 8, 10), torch.randn(3, 6, 4),
                  torch.randn(2, 3, 10, 8).transpose(-1, -2), torch.randn(2, 3, 33, 2)):
            x = x.to(dtype)
            if x.is_contiguous():
                x.view(-1)[7] = float("nan")
            x[..., 1, 1] = float("nan")
            x[..., 0, 0] = float("-inf")
            assert torch.equal(pool(x).isnan(), ref_pool(x).isnan()) and pool(x).isnan().any()
            torch.testing.assert_close(pool(x), ref_pool(x), equal_nan=True, rtol=0, atol=0)
    assert pool(torch.randn(2, 3, 1, 5)).shape == (2, 3, 0, 2)
    with pytest.raises(RuntimeError, match="input must be 3-d"):
        torch.ops.apb_sparse.max_pool2x2(torch.randn(2, 2))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.apb_sparse.max_pool2x2(torch.ones(1, 2, 2, dtype=torch.int32))
    from apb_sparse import ops, reference
    x = torch.randn(3, 5, 9, 6, dtype=torch.float64)
    assert torch.equal(ops.max_pool2x2(x), reference.max_pool2x2(x))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        ops.max_pool2x2([1.0])
    r = torch.relu(torch.randn(2, 3, 8, 8)).requires_grad_()  # many tied zeros
    pool(r).sum().backward()
    g = r.grad.clone()
    r.grad = None
    ref_pool(r).sum().backward()
    assert torch.equal(g, r.grad)
    assert MaxPool2x2.can_replace(nn.MaxPool2d(2)) and not MaxPool2x2.can_replace(nn.MaxPool2d(2, 2, ceil_mode=True))
    assert not MaxPool2x2.can_replace(nn.MaxPool2d(2, 1)) and not MaxPool2x2.can_replace(MaxPool2x2())
    back = apb_sparse.densify(deploy(m, torch.randn(1, 3, 16, 16)))
    assert not any(isinstance(mod, MaxPool2x2) for mod in back.modules())
    assert sum(type(mod) is nn.MaxPool2d for mod in back.modules()) == 3


class PoolNet(nn.Module):
    """2x2 max pools after sparse convs: a module after conv + ReLU, F.max_pool2d after a conv
    without ReLU, one after a conv whose output is also read elsewhere, and a 3x3 pool."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 24, 3, padding=1)
        self.c3, self.c4 = nn.Conv2d(24, 24, 3, padding=1), nn.Conv2d(24, 32, 3, padding=1)
        self.pool, self.pool3 = nn.MaxPool2d(2, 2), nn.MaxPool2d(3, 2, padding=1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.pool(torch.relu(self.c1(x)))
        x = nn.functional.max_pool2d(self.c2(x), 2)
        y = self.c3(x)
        x = nn.functional.max_pool2d(y, 2, 2) + y[..., 1::2, 1::2]  # c3's output has two users
        return self.fc(self.pool3(self.c4(x)).mean((2, 3)))


def test_deploy_fuses_2x2_max_pools_into_the_sparse_conv_before_them(tmp_path):
    """A 2x2 max pool that is a sparse conv's only user runs in the conv's kernel (fused_pool):
    same values as the source, gradients through the snapshot as the source's, densify and
    torch.export give the same model back; other pools stay separate."""
    torch.manual_seed(4)
    m = PoolNet().eval()
    m = apply_masks(m, magnitude_masks(m, 0.8))
    for n, h in ((16, 16), (1, 16), (9, 22)):
        x = torch.randn(n, 3, h, h)
        d = deploy(m, x)
        assert d.apb_deploy_info["fused_pools"] == ["pool", "max_pool2d"]
        pooled = {name for name, mod in d.module.named_modules() if getattr(mod, "fused_pool", False)}
        assert pooled == {"c1", "c2"}
        with torch.no_grad():
            _same(d(x), m(x), 1e-4)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        m(x1).sum().backward()
        d(x2).sum().backward()
        _same(x2.grad, x1.grad, 1e-4)
    with torch.no_grad():
        _same(torch.export.export(d, (x,)).module()(x), m(x), 1e-4)
        report = apb_sparse.sparsity_report(d, tuple(x.shape))  # pooled convs count their unpooled output
        assert report.dense_macs == apb_sparse.sparsity_report(sparsify(m), tuple(x.shape)).dense_macs
        back = densify(d)
        assert not any(getattr(mod, "fused_pool", False) for mod in back.modules())
        _same(back(x), m(x), 1e-4)
    assert "fused_pool=True" in repr(d.module.c1)
    with pytest.raises(RuntimeError, match="max_pool=True has no backward"):
        c1 = d.module.c1
        apb_sparse.ops.sparse_conv2d(x.requires_grad_(), c1.values, c1.row_ptr, c1.col_idx, c1.weight_shape, None, 1, 1,
                                     max_pool=True)


def test_deploy_runs_two_sparse_convs_in_a_row_as_one_pair(tmp_path):
    """A sparse conv whose output only feeds the next one runs with it (fused_prev): the same values
    at batch 32 (the lanes pair path) and batch 3 (two calls), gradients as the source's, state_dict
    keys unchanged, copies and saved snapshots keep the pair; densify puts the calls back."""
    torch.manual_seed(6)
    m = get_model("resnet18", width=8).eval()
    m = apply_masks(m, magnitude_masks(m, 0.8))
    x = torch.rand(32, 3, 32, 32)
    d = deploy(m, x)
    pairs = d.apb_deploy_info["fused_pairs"]
    assert len(pairs) == 8 and ("layer1.0.conv1", "layer1.0.conv2") in pairs
    # the downsampling blocks' 1x1 shortcut convs run in their pair's call
    assert [p[2] for p in pairs if len(p) == 3] == [f"layer{i}.0.shortcut.0" for i in (2, 3, 4)]
    assert d.module.get_submodule("layer2.0.conv2").fused_shortcut is d.module.get_submodule("layer2.0.shortcut.0")
    conv1, conv2 = d.module.get_submodule("layer1.0.conv1"), d.module.get_submodule("layer1.0.conv2")
    assert conv2.fused_prev is conv1 and "fused_prev='layer1.0.conv1'" in repr(conv2)
    assert set(d.state_dict()) == set(deploy(m, x, script=False).state_dict())
    # the report counts the multiply-adds of the convs that run inside a pair's call
    fused, plain = (apb_sparse.sparsity_report(model, (32, 3, 32, 32)) for model in (d, sparsify(m)))
    assert [(l.name, l.dense_macs, l.sparse_macs) for l in fused.layers] == \
        [(l.name, l.dense_macs, l.sparse_macs) for l in plain.layers]
    with torch.no_grad():
        want = m(x)
        _same(d(x), want, 1e-4)
        _same(d(x[:3]), want[:3], 1e-4)
        buf = io.BytesIO()
        torch.save(d, buf)
        loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
        for copy_ in (copy.deepcopy(d), loaded):
            got = copy_.module.get_submodule("layer1.0.conv2").fused_prev
            assert got is copy_.module.get_submodule("layer1.0.conv1") and got is not conv1  # the copy's own
            _same(copy_(x), want, 1e-4)
        _same(torch.export.export(d, (x,)).module()(x), want, 1e-4)
    x1, x2 = x[:4].clone().requires_grad_(), x[:4].clone().requires_grad_()
    m(x1).sum().backward()
    d(x2).sum().backward()
    _same(x2.grad, x1.grad, 1e-4)
    back = densify(d)
    assert conv2.fused_prev is conv1  # densify works on a copy
    assert not any(isinstance(mod, apb_sparse.nn.SparseConv2d) for mod in back.modules())
    assert sum(isinstance(mod, nn.Conv2d) for mod in back.modules()) == 20
    with torch.no_grad():
        _same(back(x), want, 1e-4)


def _tune_model():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(32, 32, 3, padding=1), nn.Flatten(), nn.Linear(32 * 8 * 8, 10)).eval()
    with torch.no_grad():
        m[2].weight.mul_(torch.rand_like(m[2].weight) > 0.9)          # 90 % sparse
        m[4].weight.mul_(torch.rand_like(m[4].weight) > 0.5)          # half dense
        m[4].weight[:, 16:] = 0                                       # and half its input channels
    return m


def test_deploy_tune_keeps_the_fastest_measured_layout(monkeypatch):
    """tune=True times each layer's candidate layouts (on its own input shape) and keeps the
    fastest: with a timer that makes "filter" cheapest, then "dense", the half-dense conv takes the
    filter layout and the linear layer stays dense, against the cost model; the 90 %-sparse conv,
    whose other layouts the cost model prices at over MAX_COST_RATIO times, is not timed; the
    snapshot still computes the model's function."""
    import apb_sparse.convert.tune as tune
    from apb_sparse.convert.layouts import layout_of

    seen = []

    def fake(candidates, x, rounds, min_time):
        for name, module in candidates.items():
            assert (layout_of(module) or "dense") == name
            seen.append((name, tuple(x.shape)))
        return {name: {"filter": 1.0, "dense": 2.0}.get(name, 3.0) for name in candidates}

    monkeypatch.setattr(tune, "time_candidates", fake)
    m, x = _tune_model(), torch.randn(4, 3, 8, 8)
    auto = deploy(m, x).apb_sparse_choices
    assert [auto[n].layout for n in ("2", "4", "6")] == ["unstructured", "unstructured", "dense"]
    d = deploy(m, x, tune=True)
    choices = d.apb_sparse_choices
    assert [choices[n].layout for n in ("2", "4", "6")] == ["unstructured", "filter", "dense"]
    assert not choices["2"].measured_ms
    assert set(choices["4"].measured_ms) == {"dense", "unstructured", "filter"}
    assert choices["4"].measured_ms["filter"] == 1.0
    assert set(choices["6"].measured_ms) == {"dense", "unstructured"}
    assert ("unstructured", (4, 32, 8, 8)) in seen and ("dense", (4, 2048)) in seen  # each layer's own input shape
    assert not any(shape == (4, 16, 8, 8) for _, shape in seen)
    with torch.no_grad():
        torch.testing.assert_close(d(x), m(x), rtol=1e-4, atol=1e-5)
    # an already converted model's layouts are timed again (without tune they are kept)
    converted = apb_sparse.sparsify(m)
    assert deploy(converted, x).apb_sparse_choices["4"].layout == "unstructured"
    assert deploy(converted, x, tune=True).apb_sparse_choices["4"].layout == "filter"
    # layers the layout argument names keep their layout and are not timed
    pinned = deploy(m, x, tune=True, layout={"4": "unstructured"}).apb_sparse_choices
    assert pinned["4"].layout == "unstructured" and not pinned["4"].measured_ms and pinned["6"].measured_ms
    # a forced layout for the whole model: nothing is timed
    seen.clear()
    assert deploy(m, x, tune=True, layout="dense").apb_sparse_choices["4"].layout == "dense" and not seen


def test_deploy_tune_with_the_real_timer():
    """With real timings the chosen layout is each tuned layer's fastest measured one, and the
    snapshot matches the model."""
    m, x = _tune_model(), torch.randn(8, 3, 8, 8)
    d = deploy(m, x, tune=True)
    tuned = {n: c for n, c in d.apb_sparse_choices.items() if c.measured_ms}
    assert tuned
    for c in tuned.values():
        assert len(c.measured_ms) >= 2 and all(v > 0 for v in c.measured_ms.values())
        assert c.layout == min(c.measured_ms, key=c.measured_ms.get)
    with torch.no_grad():
        torch.testing.assert_close(d(x), m(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="tune must be True or False"):
        deploy(m, x, tune="yes")
