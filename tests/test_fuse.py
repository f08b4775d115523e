"""Inference fusions: BatchNorm folding, ReLU and residual-add epilogues keep outputs and gradients."""
import pytest
import torch
from torch import nn

from apb_sparse import apply_masks, magnitude_masks, ops, sparsify
from apb_sparse.fuse import fold_batchnorm
from apb_sparse.models import get_model
from apb_sparse.nn import SparseConv2d


def _model(arch):
    torch.manual_seed(0)
    m = get_model(arch).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)
    return apply_masks(m, magnitude_masks(m, 0.9))


@pytest.mark.parametrize("arch,relus,residuals", [("resnet18", 17, 8), ("preact_resnet18", 8, 8)])
def test_fused_model_matches(arch, relus, residuals):
    masked = _model(arch)
    fused = sparsify(masked, fuse=True, layout="unstructured")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) < sum(
        isinstance(m, nn.BatchNorm2d) for m in masked.modules())
    assert sum(getattr(m, "fused_relu", False) for m in fused.modules()) == relus
    assert sum(1 for n in fused.graph.nodes if n.op == "call_module" and len(n.args) == 2) == residuals
    # pre-activation blocks reuse a BatchNorm's input for the shortcut: those stay, recorded
    assert all("used elsewhere" in why for why in fused.apb_fuse_skipped.values())
    assert (arch == "resnet18") == (fused.apb_fuse_skipped == {})
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), masked(x), rtol=1e-4, atol=1e-5)
    # white-box attacks differentiate through the fused deployment model
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = torch.tensor([0, 3, 7])
    nn.functional.cross_entropy(masked(x1), y).backward()
    nn.functional.cross_entropy(fused(x2), y).backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-3, atol=1e-6)


def test_fold_keeps_sparsity_and_requires_eval():
    masked = _model("vgg16")
    folded = fold_batchnorm(masked)
    for (n, a), (_, b) in zip(masked.named_modules(), folded.named_modules()):
        if isinstance(a, nn.Conv2d):
            assert torch.equal(a.weight == 0, b.weight == 0), n
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(masked.train())
    with pytest.raises(ValueError, match="eval"):
        sparsify(masked.train(), fuse=True)


def test_fused_residual_relu_op_matches_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9)
    w = torch.randn(8, 8, 3, 3) * (torch.rand(8, 8, 3, 3) > 0.7)
    b = torch.randn(8)
    r = torch.randn(2, 8, 9, 9)
    v, rp, ci = ops.pack_csr(w)
    got = ops.sparse_conv2d(x, v, rp, ci, w.shape, b, 1, 1, residual=r, relu=True)
    ref = torch.relu(nn.functional.conv2d(x, w, b, 1, 1) + r)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="residual has shape"):
        ops.sparse_conv2d(x, v, rp, ci, w.shape, b, 1, 1, residual=r[:, :4])
    layer = SparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1))
    layer.fused_relu = True
    assert (layer(x) >= 0).all()


