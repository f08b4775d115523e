"""Masked and sparse layers: equivalence, state_dict round trips, storage, bad inputs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apb_sparse.nn import (ChannelSparseConv2d, MaskedConv2d, MaskedLinear, SparseConv2d, SparseLinear,
                           masked_layers, to_masked)


def _pruned_conv(device, sparsity=0.8, **kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, **kw).to(device)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) >= sparsity)
    return conv


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, padding=1, dilation=2), dict(groups=4, padding=1)])
def test_sparse_conv_layer_equals_dense(device, kw):
    conv = _pruned_conv(device, **kw)
    x = torch.randn(3, 8, 11, 10, device=device)
    layer = SparseConv2d.from_dense(conv)
    assert layer.nnz == int(conv.weight.count_nonzero())
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.to_dense().weight, conv.weight)


def test_masked_conv_uses_mask_and_trains(device):
    conv = _pruned_conv(device, sparsity=0.0, padding=1)
    mask = (torch.rand_like(conv.weight) > 0.7).float()
    layer = MaskedConv2d.from_dense(conv, mask)
    x = torch.randn(2, 8, 9, 9, device=device, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, F.conv2d(x, conv.weight * mask, conv.bias, padding=1), rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    assert torch.all(layer.weight.grad[mask == 0] == 0)  # pruned weights get no gradient
    layer.apply_mask_()
    assert torch.all(layer.weight[mask == 0] == 0)
    assert abs(layer.sparsity - (1 - mask.mean().item())) < 1e-6


def test_mask_fn_gradients_reach_scores():
    torch.manual_seed(0)
    layer = MaskedConv2d(4, 4, 3, padding=1)
    scores = torch.randn_like(layer.weight, requires_grad=True)

    def ste_topk(lay):
        k = int(0.2 * scores.numel())
        hard = torch.zeros_like(scores).flatten()
        hard[scores.flatten().topk(k).indices] = 1
        hard = hard.view_as(scores)
        return hard + scores - scores.detach()  # straight-through
    layer.mask_fn = ste_topk
    layer(torch.randn(2, 4, 6, 6)).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    assert scores.grad[ste_topk(layer).detach() == 0].abs().sum() > 0  # pruned positions learn too


def test_sparse_linear_layer(device):
    torch.manual_seed(0)
    lin = nn.Linear(20, 7).to(device)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) > 0.9)
    layer = SparseLinear.from_dense(lin)
    x = torch.randn(5, 20, device=device)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.to_dense().weight, lin.weight)
    masked = MaskedLinear.from_dense(lin, (lin.weight != 0).float())
    torch.testing.assert_close(masked(x), lin(x))
    # state_dict round trip into a layer with a different nonzero count; only nonzeros stored
    fresh = SparseLinear.from_dense(nn.Linear(20, 7).to(device))
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), lin(x), rtol=1e-5, atol=1e-5)
    assert layer.state_dict()["values"].numel() == int(lin.weight.count_nonzero())


@pytest.mark.parametrize("cls", [SparseConv2d, ChannelSparseConv2d])
def test_state_dict_round_trip_and_storage(cls, tmp_path):
    conv = _pruned_conv("cpu", sparsity=0.9, padding=1)
    with torch.no_grad():
        conv.weight[3] = 0
        conv.weight[:, 5] = 0
    layer = cls.from_dense(conv)
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    fresh = cls.from_dense(nn.Conv2d(8, 12, 3, padding=1))  # different nonzeros / kept channels
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(fresh(x), conv(x), rtol=1e-5, atol=1e-5)
    stored = sum(t.numel() for k, t in layer.state_dict().items() if k in ("values", "weight"))
    if cls is SparseConv2d:
        assert stored == int(conv.weight.count_nonzero())  # only the nonzeros
    else:
        assert stored == 11 * 7 * 9  # kept filters x kept channels x taps


def test_to_masked_and_masked_layers():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    masked = to_masked(model)
    assert [n for n, _ in masked_layers(masked)] == ["0", "3"]
    assert not list(masked_layers(model))  # not inplace by default
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(masked(x), model(x))


def test_layer_bad_inputs():
    conv = nn.Conv2d(4, 4, 3)
    with pytest.raises(ValueError, match="mask has shape"):
        MaskedConv2d.from_dense(conv, torch.ones(4, 4, 3, 2))
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        SparseConv2d.from_dense(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="mask has shape"):
        SparseConv2d.from_dense(conv, torch.ones(1))
    with pytest.raises(ValueError, match="groups == 1"):
        ChannelSparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        SparseConv2d(4, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="padding"):
        SparseConv2d(4, 4, 3, padding="full")
    layer = MaskedConv2d(4, 4, 3)
    with pytest.raises(ValueError, match="mask has shape"):
        layer.set_mask(torch.ones(3))
    with pytest.raises(TypeError, match="mask must be bool or floating point"):
        layer.set_mask(torch.ones(4, 4, 3, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Issue 12: valid models the layers used to refuse, and results that were silently wrong.

def _masked_pair(conv, sparsity, structured=False, seed=0):
    """(mask, reference nn.Conv2d holding weight * mask with the same padding and mode)."""
    g = torch.Generator().manual_seed(seed)
    if structured:  # whole filters and input channels, the structured path's unit
        keep_out = torch.rand(conv.out_channels, generator=g) >= sparsity
        keep_in = torch.rand(conv.in_channels // conv.groups, generator=g) >= sparsity
        mask = (keep_out[:, None, None, None] & keep_in[None, :, None, None]).expand_as(conv.weight).float()
    else:
        mask = (torch.rand(conv.weight.shape, generator=g) >= sparsity).float()
    ref = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        ref.weight.copy_(conv.weight * mask)
        if conv.bias is not None:
            ref.bias.copy_(conv.bias)
    return mask.to(conv.weight.dtype), ref


LAYERS = {
    "SparseConv2d": lambda conv, m: SparseConv2d.from_dense(conv, m),
    "ChannelSparseConv2d": lambda conv, m: ChannelSparseConv2d.from_dense(conv, m),
    "MaskedConv2d": lambda conv, m: MaskedConv2d.from_dense(conv, m),  # sparse kernel (density < 0.5)
}


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding,dilation", [(1, 1), ((2, 1), 1), ("same", 1), ("same", 2), ("valid", 1)])
@pytest.mark.parametrize("layer", ["SparseConv2d", "ChannelSparseConv2d", "MaskedConv2d"])
def test_padding_modes_and_string_padding_on_every_path(mode, padding, dilation, layer):
    # ChannelSparseConv2d used zero padding whatever the mode (max error 1.36 before); the
    # unstructured layers refused the non-zero modes and "same" / "valid".
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 6, (3, 2), padding=padding, dilation=dilation, padding_mode=mode)
    mask, ref = _masked_pair(conv, 0.7, structured=layer == "ChannelSparseConv2d")
    built = LAYERS[layer](conv, mask)
    assert built.to_dense().padding_mode == mode
    for x in (torch.randn(2, 5, 7, 8), torch.randn(5, 7, 8)):  # batched and unbatched
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        out, want = built(xa), ref(xb)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        gout = torch.randn_like(want)
        out.backward(gout)
        want.backward(gout)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)


def test_masked_conv_dense_path_padding_modes():
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    layer = MaskedConv2d.from_dense(conv)  # all ones: dense kernel
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer(x), conv(x))
    torch.testing.assert_close(layer(x[0]), conv(x[0]))


def _nan_input(shape, where):
    x = torch.randn(*shape)
    for idx, value in where:
        x[idx] = value
    return x


@pytest.mark.parametrize("tiles", [True, False])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_fused_relu_keeps_nan_like_torch_relu(tiles, residual, value):
    from apb_sparse import ops

    conv = nn.Conv2d(4, 8, 3, padding=1)  # dense weights: every tap is kept
    layer = SparseConv2d.from_dense(conv)
    layer.fused_relu = True
    x = _nan_input((2, 4, 8, 8), [((0, 1, 3, 4), value), ((1, 2, 0, 0), value)])
    r = torch.randn(2, 8, 8, 8) if residual else None
    want = conv(x) if r is None else conv(x) + r
    want = torch.relu(want)
    previous = ops.use_row_tiles(tiles)  # 8x8 outputs: whole output rows per tile when enabled
    try:
        got = layer(x, r) if residual else layer(x)
    finally:
        ops.use_row_tiles(previous)
    assert torch.isnan(want).any() or torch.isinf(want).any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_non_finite_inputs_reach_only_outputs_that_read_them():
    # The deployed (sparse) layer computes with its nonzeros only: a NaN / Inf pixel changes only
    # the outputs whose kept taps read it; F.conv2d(x, w * mask) would spread NaN through the
    # pruned taps too (0 * nan = nan).  This is the documented behaviour (README, "Non-finite inputs").
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    mask, ref = _masked_pair(conv, 0.8)
    layer = SparseConv2d.from_dense(conv, mask)
    for value in (float("nan"), float("inf")):
        bad = torch.zeros(1, 3, 6, 6, dtype=torch.bool)
        bad[0, 1, 2, 3] = True
        x = torch.randn(1, 3, 6, 6).masked_fill(bad, value)
        got = layer(x)
        # Outputs with a kept tap on the bad pixel are non-finite, every other one is exact.
        reads = F.conv2d(bad.float(), (ref.weight != 0).float(), padding=1) > 0
        assert reads.any() and not reads.all()
        assert not torch.isfinite(got[reads]).any()
        finite = ref(x.masked_fill(bad, 0))
        torch.testing.assert_close(got[~reads], finite[~reads], rtol=1e-5, atol=1e-5)
        # The dense reference differs exactly there: it spreads NaN through pruned taps as well.
        if value != value:
            dense_nan = torch.isnan(F.conv2d(x, ref.weight, padding=1))
            assert (dense_nan & ~reads).any()
    lin = nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        lin.weight[:, 2] = 0  # input feature 2 is pruned everywhere
        lin.weight[0, 3] = 0
    sparse_lin = SparseLinear.from_dense(lin)
    x = torch.randn(2, 6)
    x[0, 2] = float("nan")
    x[1, 3] = float("inf")
    out = sparse_lin(x)
    assert torch.isfinite(out[0]).all()  # the NaN sits on a pruned input
    assert torch.isfinite(out[1, 0]) and torch.isinf(out[1, 1:]).all()


def _penalty_grads(layer_fn, x, params):
    x = x.clone().requires_grad_(True)
    out = layer_fn(x)
    (g,) = torch.autograd.grad((out ** 2).sum(), x, create_graph=True)
    penalty = (g ** 2).sum() + (out * x.sum()).sum()
    return torch.autograd.grad(penalty, [x] + params)


@pytest.mark.parametrize("density", [0.3, 0.9])  # sparse kernel / dense kernel paths
def test_masked_conv_double_backward(density):
    # Gradient penalties (create_graph=True) were silently wrong: torch only warned.
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2, dtype=torch.float64)
    mask = (torch.rand_like(conv.weight) < density).double()
    layer = MaskedConv2d.from_dense(conv, mask)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    got = _penalty_grads(layer, x, [layer.weight, layer.bias])
    w, b = conv.weight.detach().clone().requires_grad_(True), conv.bias.detach().clone().requires_grad_(True)
    want = _penalty_grads(lambda t: F.conv2d(t, w * mask, b, 2, 1), x, [w, b])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_mask_fn_double_backward_reaches_scores():
    torch.manual_seed(0)
    layer = MaskedConv2d(3, 4, 3, padding=1, dtype=torch.float64)
    scores = torch.rand(layer.weight.shape, dtype=torch.float64, requires_grad=True)
    layer.mask_fn = lambda l: scores * (scores > 0.7)  # soft mask through a mask_fn, 30% kept
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    (g_scores,) = _penalty_grads(layer, x, [scores])[1:]
    w = layer.weight.detach()
    (want,) = _penalty_grads(lambda t: F.conv2d(t, w * (scores * (scores > 0.7)), layer.bias.detach(), 1, 1), x,
                             [scores])[1:]
    torch.testing.assert_close(g_scores, want)


def test_sparse_layers_double_backward():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
    mask, ref = _masked_pair(conv, 0.6)
    layer = SparseConv2d.from_dense(conv, mask.double())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    got = _penalty_grads(layer, x, [])
    want = _penalty_grads(ref.double(), x, [])
    torch.testing.assert_close(got[0], want[0])
    layer.fused_relu = True
    got = _penalty_grads(layer, x, [])
    want = _penalty_grads(lambda t: torch.relu(ref.double()(t)), x, [])
    torch.testing.assert_close(got[0], want[0])
    lin = nn.Linear(5, 3, dtype=torch.float64)
    with torch.no_grad():
        lin.weight[0, :3] = 0
    xs = torch.randn(4, 5, dtype=torch.float64)
    got = _penalty_grads(SparseLinear.from_dense(lin), xs, [])
    want = _penalty_grads(lin, xs, [])
    torch.testing.assert_close(got[0], want[0])


def test_set_mask_refuses_soft_masks_and_apply_is_idempotent():
    torch.manual_seed(0)
    layer = MaskedConv2d(3, 4, 3)
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        layer.set_mask(torch.full_like(layer.weight, 0.5))
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        layer.set_mask(torch.full_like(layer.weight, float("nan")))
    torch.testing.assert_close(layer.weight, w0)  # a refused mask changes nothing
    mask = (torch.rand_like(layer.weight) > 0.5).float()
    layer.set_mask(mask)
    layer.set_mask(mask)
    layer.apply_mask_()
    torch.testing.assert_close(layer.weight, w0 * mask)
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(layer(x), F.conv2d(x, w0 * mask, layer.bias), rtol=1e-5, atol=1e-5)


def test_csr_state_dict_is_validated_on_load():
    conv = _pruned_conv("cpu", sparsity=0.5, padding=1)
    layer = SparseConv2d.from_dense(conv)
    sd = layer.state_dict()
    cases = {
        "row_ptr has": dict(row_ptr=torch.cat([sd["row_ptr"], sd["row_ptr"][-1:]])),  # one more output row
        "row_ptr must be non-decreasing": dict(row_ptr=torch.cat([sd["row_ptr"][:1], sd["row_ptr"][-1:],
                                                                  sd["row_ptr"][2:]])),
        "col_idx entry": dict(col_idx=sd["col_idx"] + 10_000),
        "col_idx repeats": dict(col_idx=torch.zeros_like(sd["col_idx"])),
        "col_idx has": dict(col_idx=sd["col_idx"][:-1]),
        "must be int32": dict(row_ptr=sd["row_ptr"].long()),
    }
    for pattern, change in cases.items():
        fresh = SparseConv2d.from_dense(conv)
        with pytest.raises(RuntimeError, match=pattern):
            fresh.load_state_dict({**sd, **change})
        assert fresh.nnz == layer.nnz  # nothing replaced
    with pytest.raises(RuntimeError, match="loaded together"):
        SparseConv2d.from_dense(conv).load_state_dict({k: v for k, v in sd.items() if k != "col_idx"},
                                                      strict=False)
    lin = SparseLinear.from_dense(nn.Linear(5, 4))
    sd = lin.state_dict()
    with pytest.raises(RuntimeError, match="row_ptr has 6 entries, expected 5"):
        SparseLinear.from_dense(nn.Linear(5, 4)).load_state_dict(
            {**sd, "row_ptr": torch.tensor([0, 5, 10, 15, 20, 20], dtype=torch.int32)})


def test_repeated_csr_entries_are_summed_consistently():
    from apb_sparse import ops

    values = torch.tensor([1.0, 2.0, 4.0])
    row_ptr = torch.tensor([0, 3], dtype=torch.int32)
    col_idx = torch.tensor([1, 1, 0], dtype=torch.int32)
    dense = ops.unpack_csr(values, row_ptr, col_idx, (1, 2))
    torch.testing.assert_close(dense, torch.tensor([[4.0, 3.0]]))  # was [4, 2]: overwritten
    x = torch.randn(3, 2)
    torch.testing.assert_close(ops.sparse_linear(x, values, row_ptr, col_idx, 2), x @ dense.T)


def test_zero_size_layers_and_batch_zero():
    # Zero output channels / features, zero input channels / features and empty batches.  For
    # a convolution without input channels the output is the bias (torch returns 0 channels).
    conv0 = nn.Conv2d(0, 4, 3)
    with torch.no_grad():
        conv0.bias.copy_(torch.arange(4.0))
    layer = SparseConv2d.from_dense(conv0)
    out = layer(torch.randn(2, 0, 5, 5))
    torch.testing.assert_close(out, torch.arange(4.0).view(1, 4, 1, 1).expand(2, 4, 3, 3))
    assert SparseConv2d(4, 0, 3)(torch.randn(2, 4, 5, 5)).shape == (2, 0, 3, 3)
    assert MaskedConv2d(4, 0, 3)(torch.randn(2, 4, 5, 5)).shape == (2, 0, 3, 3)
    lin0 = nn.Linear(0, 3)
    torch.testing.assert_close(SparseLinear.from_dense(lin0)(torch.randn(2, 0)), lin0(torch.randn(2, 0)))
    assert SparseLinear(3, 0)(torch.randn(2, 3)).shape == (2, 0)
    x = torch.randn(2, 3, requires_grad=True)
    SparseLinear(3, 0)(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros(2, 3))
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
    mask, ref = _masked_pair(conv, 0.5, structured=True)
    for build in (SparseConv2d.from_dense, ChannelSparseConv2d.from_dense, MaskedConv2d.from_dense):
        x = torch.randn(0, 3, 6, 6, requires_grad=True)
        out = build(conv, mask)(x)
        assert out.shape == (0, 4, 6, 6)
        out.sum().backward()
        assert x.grad.shape == x.shape
    for build in (SparseLinear.from_dense, ):
        x = torch.randn(0, 5, requires_grad=True)
        assert build(nn.Linear(5, 2))(x).shape == (0, 2)


def test_fully_pruned_channel_layer_stays_in_the_graph():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    layer = ChannelSparseConv2d.from_dense(conv, torch.zeros_like(conv.weight))
    assert layer.in_index.numel() == 0
    x = torch.randn(2, 3, 5, 5)
    x[0, 0, 0, 0] = float("nan")  # an empty slice's sum stays 0 even for non-finite inputs
    x.requires_grad_(True)
    out = layer(x)
    assert out.requires_grad
    torch.testing.assert_close(out, torch.zeros(2, 4, 3, 3))
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    torch.manual_seed(0)
    conv = _pruned_conv("cpu", sparsity=0.7, padding=1)
    lin = nn.Linear(6, 3)
    x = torch.randn(2, 8, 6, 6).to(dtype)
    xl = torch.randn(4, 6).to(dtype)
    conv_h = nn.Conv2d(8, 12, 3, padding=1)
    with torch.no_grad():
        conv_h.weight.copy_(conv.weight.to(dtype).float())
        conv_h.bias.copy_(conv.bias.to(dtype).float())
    want = conv_h(x.float()).to(dtype)  # float32 accumulation of the rounded weights, rounded once
    for layer in (SparseConv2d.from_dense(conv).to(dtype), MaskedConv2d.from_dense(conv, (conv.weight != 0).float())
                  .to(dtype)):
        got = layer(x)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    sl = SparseLinear.from_dense(lin).to(dtype)
    want = F.linear(xl.float(), lin.weight.to(dtype).float(), lin.bias.to(dtype).float()).to(dtype)
    xg = xl.clone().requires_grad_(True)
    got = sl(xg)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    got.sum().backward()
    assert xg.grad.dtype == dtype
    with pytest.raises(TypeError, match="dtype"):
        SparseLinear.from_dense(lin)(xl)  # float32 weights, half input: refused like nn.Linear
