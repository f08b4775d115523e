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
        MaskedConv2d(4, 4, 3, padding_mode="reflect")
    layer = MaskedConv2d(4, 4, 3)
    with pytest.raises(ValueError, match="mask has shape"):
        layer.set_mask(torch.ones(3))
    with pytest.raises(TypeError, match="mask must be bool or floating point"):
        layer.set_mask(torch.ones(4, 4, 3, 3, dtype=torch.long))
