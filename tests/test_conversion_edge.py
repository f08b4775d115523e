"""Conversion edge cases: sparsify / densify / compact / fuse never crash and never change what a
model computes; what they cannot convert or fuse stays as it is, with the reason recorded."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import apb_sparse
from apb_sparse import apply_masks, compact, densify, magnitude_masks, sparsify
from apb_sparse.nn import ChannelSparseConv2d, SparseConv2d, SparseLinear
from apb_sparse.sparsify import register_converter, unregister_converter

sp = importlib.import_module("apb_sparse.sparsify")  # the module (apb_sparse.sparsify is the function)


def _prune(model, sparsity=0.7):
    return apply_masks(model, magnitude_masks(model, sparsity))


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------ layers with their own forward


class WSConv2d(nn.Conv2d):
    """Weight-standardised conv: a plain conv of a function of the weight."""

    def standardized(self):
        w = self.weight
        return (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)

    def forward(self, x):
        return F.conv2d(x, self.standardized(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class NoisyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


def _ws_model():
    torch.manual_seed(0)
    return nn.Sequential(WSConv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                         NoisyLinear(8 * 36, 5)).eval()


def test_subclasses_overriding_forward_are_left_as_they_are():
    model = _prune(_ws_model())
    x = torch.rand(2, 3, 6, 6)
    out = sparsify(model)
    assert type(out[0]) is WSConv2d and type(out[4]) is NoisyLinear
    assert "overrides forward" in out.apb_sparse_choices["0"].reason
    assert "register_converter" in out.apb_sparse_choices["4"].reason
    assert out.apb_sparse_choices["2"].reason is None
    with torch.no_grad():
        _close(out(x), model(x))


def test_masks_of_left_layers_apply_as_apply_masks_does():
    model = _ws_model()
    masks = magnitude_masks(model, 0.6)
    out = sparsify(model, masks)
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        _close(out(x), apply_masks(model, masks)(x))


def test_register_converter_converts_a_custom_layer():
    @register_converter(WSConv2d)
    def _convert(layer):
        conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, layer.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(layer.standardized())
            conv.bias.copy_(layer.bias)
        return conv

    try:
        model = _ws_model()
        x = torch.rand(2, 3, 6, 6)
        mask = magnitude_masks(model, 0.8, layers=["0"])["0"]
        out = sparsify(model, {"0": mask}, layout={"0": "unstructured"})
        assert isinstance(out[0], SparseConv2d) and out.apb_sparse_choices["0"].reason is None
        # the mask applies to the converted (standardised) weight
        ref = _convert(model[0])
        ref.weight.data.mul_(mask)
        with torch.no_grad():
            _close(out[0](x), ref(x))
    finally:
        unregister_converter(WSConv2d)
    with pytest.raises(TypeError, match="cls"):
        register_converter(nn.ReLU, lambda m: m)


def test_multihead_attention_and_transformer_layers_keep_working():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            x = self.mha(x, x, x, need_weights=False)[0]
            return self.head(self.enc(x))

    model = _prune(Net().eval(), 0.8)
    out = sparsify(model, layout="unstructured")
    x = torch.rand(2, 5, 8)
    with torch.no_grad():
        _close(out(x), model(x))
    ch = out.apb_sparse_choices
    assert "MultiheadAttention" in ch["mha.out_proj"].reason
    assert "TransformerEncoderLayer" in ch["enc.linear1"].reason
    assert isinstance(out.head, SparseLinear)


# ------------------------------------------------------------------ fused ReLU survives densify / compact


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.relu(self.bn1(self.c1(x)))
        return F.relu(self.bn2(self.c2(y)) + x)


def _block():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(4, 3)).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2)
    return _prune(m, 0.8)


def test_densify_and_compact_keep_fused_relu_and_residual():
    model = _block()
    fused = sparsify(model, fuse=True, layout="unstructured")
    assert sum(getattr(m, "fused_relu", False) for m in fused.modules()) == 3
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        ref = model(x)
        _close(fused(x), ref)
        _close(densify(fused)(x), ref)  # raised a positional-argument error before
        _close(compact(fused, x)(x), ref)
        _close(fused(x), ref)  # densify / compact worked on copies
    from apb_sparse.fuse import unfuse
    again = unfuse(sparsify(model, fuse=True, layout="unstructured"))
    assert not any(getattr(m, "fused_relu", False) for m in again.modules())
    with torch.no_grad():
        _close(again(x), ref)


def test_densify_of_fused_relu_outside_a_graph():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    layer = SparseConv2d.from_dense(conv)
    layer.fused_relu = True
    model = nn.Sequential(layer, nn.Flatten())
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        ref = model(x)
        assert (ref >= 0).all() and (ref == 0).any()
        _close(densify(model)(x), ref)
        _close(compact(model, x)(x), ref)


# ------------------------------------------------------------------ fusions that must not happen


class AddParam(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.register_buffer("pos", torch.randn(1, 4, 6, 6))
        self.side = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.kind == "param":
            y = y + self.scale
        elif self.kind == "buffer":
            y = self.pos + y
        elif self.kind == "pooled":  # a computed residual that broadcasts: (N, 4, 1, 1)
            y = y + F.adaptive_avg_pool2d(self.side(x), 1)
        elif self.kind == "float64":
            y = y + self.side(x).double()
        elif self.kind == "bigger":  # the residual is larger than the conv output after broadcasting
            y = F.adaptive_avg_pool2d(y, 1)
            return y
        return F.relu(y)


@pytest.mark.parametrize("kind", ["param", "buffer", "pooled", "float64"])
def test_fuse_handles_broadcasting_and_mixed_dtype_adds(kind):
    torch.manual_seed(0)
    model = _prune(AddParam(kind).eval(), 0.6)
    fused = sparsify(model, fuse=True, layout="unstructured")
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
        got = fused(x)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    _close(got.float(), ref.float())
    residual_fused = any(n.op == "call_module" and len(n.args) == 2 for n in fused.graph.nodes)
    assert residual_fused == (kind in ("pooled", "float64"))  # checked at run time, unfused there
    if kind == "param":
        assert "parameter or buffer" in fused.apb_fuse_skipped["conv"]
    # gradients (white-box attacks) through the fused model
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    model(x1).sum().backward()
    fused(x2).sum().backward()
    _close(x2.grad, x1.grad, 1e-4)


def test_batchnorm_without_running_stats_stays_unfused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval()
    fused = sparsify(_prune(model), fuse=True)
    assert "track_running_stats" in fused.apb_fuse_skipped["1"]
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        _close(fused(x), _prune(model)(x))


def test_shared_conv_called_twice_is_not_fused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.conv(F.relu(self.bn(self.conv(x))))  # ReLU after the first call only

    torch.manual_seed(0)
    model = Twice().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model = _prune(model, 0.5)
    fused = sparsify(model, fuse=True, layout="unstructured")
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        _close(fused(x), model(x))
    assert not fused.conv.fused_relu and isinstance(fused.bn, nn.BatchNorm2d)
    assert "more than once" in fused.apb_fuse_skipped["bn"]


def test_untraceable_model_is_left_unfused():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            if y.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return F.relu(y)
            return y

    torch.manual_seed(0)
    model = _prune(Branchy().eval())
    fused = sparsify(model, fuse=True)
    assert "cannot trace" in fused.apb_fuse_skipped[""]
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        _close(fused(x), model(x))
        with pytest.warns(UserWarning, match="cannot trace"):
            small = compact(sparsify(model, layout="unstructured"), x)
        _close(small(x), model(x))
    assert small.apb_compact_removed == {}


# ------------------------------------------------------------------ padding


@pytest.mark.parametrize("padding,kernel,dilation", [("same", 3, 1), ("same", 3, 2), ("valid", 3, 1),
                                                     ("same", 4, 1)])
@pytest.mark.parametrize("layout", ["unstructured", "filter", "auto"])
def test_string_padding_converts(padding, kernel, dilation, layout):
    torch.manual_seed(0)
    model = _prune(nn.Sequential(nn.Conv2d(3, 6, kernel, padding=padding, dilation=dilation), nn.ReLU(),
                                 nn.Conv2d(6, 4, 3, padding="same")).eval(), 0.7)
    out = sparsify(model, layout=layout)
    x = torch.randn(2, 3, 9, 8)
    with torch.no_grad():
        ref = model(x)
        _close(out(x), ref)
        _close(densify(out)(x), ref)
        _close(compact(out, x)(x), ref)
    choice = out.apb_sparse_choices["0"]
    if layout != "auto":  # "same" with an even kernel pads one side more: converted, or dense saying why
        assert (choice.layout == layout and not isinstance(out[0], nn.Conv2d)) or \
            (kernel == 4 and "pads one side more" in choice.reason)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("layout", ["unstructured", "filter"])
def test_padding_mode_is_never_silently_zeros(mode, layout):
    torch.manual_seed(0)
    model = _prune(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, padding_mode=mode), nn.ReLU(),
                                 nn.Conv2d(6, 4, 3, padding=2, padding_mode=mode)).eval(), 0.7)
    x = torch.randn(2, 3, 7, 7)
    out = sparsify(model, layout=layout)
    with torch.no_grad():
        ref = model(x)
        _close(out(x), ref)
        _close(densify(out)(x), ref)
        small = compact(out, x)
        _close(small(x), ref)
    for layer in small.modules():
        if isinstance(layer, nn.Conv2d):
            assert layer.padding_mode == mode
    for name in ("0", "2"):
        c = out.apb_sparse_choices[name]
        assert getattr(out.get_submodule(name), "padding_mode", None) == mode or c.reason


# ------------------------------------------------------------------ zero-size layers, coupled masks


def test_zero_size_layers():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.empty_conv = nn.Conv2d(3, 0, 3)
            self.conv = nn.Conv2d(3, 4, 3)
            self.empty_in = nn.Linear(0, 2)
            self.empty_out = nn.Linear(4, 0)

        def forward(self, x):  # (PyTorch itself cannot run a conv with no output channel)
            y = self.conv(x).mean((2, 3))
            return torch.cat([self.empty_in(y[:, :0]), self.empty_out(y), y], 1)

    model = Net().eval()
    masks = magnitude_masks(model, 0.5)
    out = sparsify(model, masks, layout="unstructured")
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        _close(out(x), apply_masks(model, masks)(x))
        _close(densify(out)(x), apply_masks(model, masks)(x))
        _close(compact(out, x)(x), apply_masks(model, masks)(x))
    for name in ("empty_conv", "empty_in", "empty_out"):
        assert "zero-size" in out.apb_sparse_choices[name].reason
    assert isinstance(out.conv, SparseConv2d)
    apb_sparse.sparsity_report(out, (1, 3, 5, 5))


def test_coupled_channel_masks_without_convs():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 2))
    masks = magnitude_masks(mlp, 0.5, structure="filter", coupled=True)
    assert set(masks) == {"1", "3"} and all(bool(m.all()) for m in masks.values())
    assert magnitude_masks(nn.Sequential(nn.ReLU()), 0.5, structure="filter", coupled=True) == {}


# ------------------------------------------------------------------ half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    torch.manual_seed(0)
    model = _prune(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(8 * 25, 4)).eval(), 0.8).to(dtype)
    x = torch.randn(2, 3, 5, 5, dtype=dtype)
    out = sparsify(model, layout="unstructured")
    with torch.no_grad():
        got = out(x)
        ref = model(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for c in out.apb_sparse_choices.values():
        assert c.layout == "unstructured" or c.reason


def test_layers_the_kernels_refuse_stay_dense(monkeypatch):
    """If the compiled kernels refuse a dtype, the layer stays a dense layer and says why."""
    original = SparseConv2d.forward

    def refusing(self, input, residual=None):
        if input.dtype == torch.float16:
            raise TypeError("input must be float32 or float64, got torch.float16")
        return original(self, input, residual)

    monkeypatch.setattr(SparseConv2d, "forward", refusing)
    monkeypatch.setattr(sp, "_PROBED", {})
    torch.manual_seed(0)
    model = _prune(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()).half()
    out = sparsify(model, layout="unstructured")
    assert type(out[0]) is nn.Conv2d
    assert "float16" in out.apb_sparse_choices["0"].reason
    with torch.no_grad():
        x = torch.randn(1, 3, 5, 5, dtype=torch.float16)
        torch.testing.assert_close(out(x).float(), model(x).float(), rtol=1e-2, atol=1e-2)
    out32 = sparsify(model.float(), layout="unstructured")
    assert isinstance(out32[0], SparseConv2d)


def test_structured_layer_kept_in_choices_and_state_dict_round_trip():
    """Layers left as they are round-trip through the recorded paths (what load_checkpoint does)."""
    model = _prune(_ws_model())
    out = sparsify(model)
    paths = {n: c.layout for n, c in out.apb_sparse_choices.items()}
    rebuilt = sparsify(_ws_model(), layout=paths)
    rebuilt.load_state_dict(out.state_dict())
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        _close(rebuilt(x), out(x))
    assert not isinstance(out[2], ChannelSparseConv2d) or paths["2"] == "filter"


def test_parametrized_layers_convert_with_their_effective_weight():
    """weight_norm / spectral_norm parametrizations keep the base forward: converted, same outputs."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Conv2d(3, 6, 3)), nn.ReLU(), nn.Flatten(),
                          parametrizations.spectral_norm(nn.Linear(6 * 9, 4))).eval()
    masks = magnitude_masks(model, 0.7)
    out = sparsify(model, masks, layout="unstructured")
    assert isinstance(out[0], SparseConv2d) and isinstance(out[3], SparseLinear)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        w0 = model[0].weight * masks["0"]
        w3 = model[3].weight * masks["3"]
        ref = F.linear(F.relu(F.conv2d(x, w0, model[0].bias)).flatten(1), w3, model[3].bias)
        _close(out(x), ref)
