"""Inference fusions: BatchNorm folding, ReLU and residual-add epilogues keep outputs and gradients."""
import pytest
import torch
from torch import nn

from apb_sparse import apply_masks, magnitude_masks, ops, sparsify
from apb_sparse.fuse import fold_batchnorm, fuse_activations, fused_conv_add
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
    fused = sparsify(masked, fuse=True, path="unstructured")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) < sum(
        isinstance(m, nn.BatchNorm2d) for m in masked.modules())
    assert sum(getattr(m, "fused_relu", False) for m in fused.modules()) == relus
    assert sum(1 for n in fused.graph.nodes if n.target is fused_conv_add) == residuals
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


# -- sparsify's default: eval fusions that keep the model (fuse="auto") -----------------------

def _count_bn_calls(monkeypatch):
    calls = []
    orig = nn.BatchNorm2d.forward
    monkeypatch.setattr(nn.BatchNorm2d, "forward", lambda self, x: calls.append(1) or orig(self, x))
    return calls


@pytest.mark.parametrize("arch", ["resnet18", "preact_resnet18", "vgg16", "wrn28_4"])
def test_default_sparsify_is_fused_in_eval_and_keeps_the_model(arch, monkeypatch):
    from apb_sparse.fuse import has_eval_fusions
    masked = _model(arch)
    plain = sparsify(masked, fuse=False)
    fast = sparsify(masked)
    assert has_eval_fusions(fast) and not has_eval_fusions(plain)
    assert type(fast) is type(masked)  # not a GraphModule: indexing, attributes, methods stay
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.rand(2, 3, 32, 32)
    calls = _count_bn_calls(monkeypatch)
    with torch.no_grad():
        ref = masked(x)
        n = len(calls)
        torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-5)
        fused_calls = len(calls) - n
    # every BatchNorm after a conv is folded (pre-activation nets keep the ones before a conv)
    total = sum(isinstance(m, nn.BatchNorm2d) for m in masked.modules())
    assert fused_calls < n or n == 0
    if arch in ("resnet18", "vgg16"):
        assert fused_calls == 0 and n == total
    # input gradients (white-box attacks): with parameters requiring grad the chains run unfused,
    # without, fused; both match the masked model
    y = torch.tensor([0, 3])
    for frozen in (False, True):
        for p in fast.parameters():
            p.requires_grad_(not frozen)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        nn.functional.cross_entropy(masked(x1), y).backward()
        nn.functional.cross_entropy(fast(x2), y).backward()
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-3, atol=1e-6)


def test_default_fusions_follow_train_mode_and_state_changes():
    masked = _model("resnet18")
    fast, plain = sparsify(masked), sparsify(masked, fuse=False)
    x = torch.rand(4, 3, 32, 32)
    # training mode: the model's own forward (batch statistics, running stats updated)
    fast.train(), plain.train()
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.bn1.running_mean, plain.bn1.running_mean)
    fast.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
        # in-place statistics updates, a replaced parameter and a loaded state_dict are all seen
        fast.layer1[0].bn1.running_mean.add_(0.5)
        plain.layer1[0].bn1.running_mean.add_(0.5)
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
        fast.layer2[0].bn2.weight = nn.Parameter(torch.full((128,), 0.25))
        plain.layer2[0].bn2.weight = nn.Parameter(torch.full((128,), 0.25))
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
        other = sparsify(_model("resnet18").apply(_jitter), fuse=False)
        fast.load_state_dict(other.state_dict())
        torch.testing.assert_close(fast(x), other(x), rtol=1e-4, atol=1e-5)
        # a replaced module is looked up at every call
        fast.layer1[0].bn1 = nn.Identity()
        other.layer1[0].bn1 = nn.Identity()
        torch.testing.assert_close(fast(x), other(x), rtol=1e-4, atol=1e-5)
        fast.layer3[0].relu1 = nn.Tanh()
        other.layer3[0].relu1 = nn.Tanh()
        torch.testing.assert_close(fast(x), other(x), rtol=1e-4, atol=1e-5)


def _jitter(m):
    if isinstance(m, nn.BatchNorm2d):
        with torch.no_grad():
            m.running_var.mul_(1.7)
            m.bias.add_(0.1)


def test_default_fusions_respect_hooks_copies_and_pickles(tmp_path):
    import copy
    masked = _model("resnet18")
    fast = sparsify(masked)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = masked(x)
        seen = []
        h = fast.layer2[1].bn1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-5)
        assert seen == [torch.Size((2, 128, 16, 16))]  # the hooked chain ran unfused
        h.remove()
        twin = copy.deepcopy(fast)
        assert twin.forward.owner is twin
        torch.testing.assert_close(twin(x), ref, rtol=1e-4, atol=1e-5)
        torch.save(fast, tmp_path / "m.pt")
        back = torch.load(tmp_path / "m.pt", weights_only=False)
        torch.testing.assert_close(back(x), ref, rtol=1e-4, atol=1e-5)
        from apb_sparse.fuse import has_eval_fusions
        assert has_eval_fusions(back)
        from apb_sparse import densify
        assert not has_eval_fusions(densify(fast))


class _OptionalResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, extra=None, scale: float = 1.0):
        out = self.bn(self.conv(x))
        if extra is not None:
            out = out + extra
        return torch.relu(out) * scale


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.bn(self.conv(x))
        return x


class _InPlaceAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, r):
        out = self.conv(x)
        out += r
        return torch.relu(out)


def test_default_fusions_on_unusual_models():
    from apb_sparse.fuse import has_eval_fusions
    torch.manual_seed(0)
    m = _OptionalResidual().eval()
    m.bn.running_var.uniform_(0.5, 2)
    m.conv.weight.data *= (torch.rand_like(m.conv.weight) > 0.8)
    fast = sparsify(m, path="unstructured")
    assert has_eval_fusions(fast)
    x, e = torch.rand(2, 4, 8, 8), torch.rand(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), m(x), rtol=1e-5, atol=1e-6)
        # arguments other than the traced ones: the model's own forward
        torch.testing.assert_close(fast(x, e), m(x, e), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast(x, scale=3.0), m(x, scale=3.0), rtol=1e-5, atol=1e-6)
    u = _Untraceable().eval()
    fu = sparsify(u)
    assert not has_eval_fusions(fu) and "torch.fx cannot trace" in fu.apb_fuse_skipped[""]
    with torch.no_grad():
        torch.testing.assert_close(fu(x), u(x), rtol=1e-5, atol=1e-6)
    p = _InPlaceAdd().eval()
    fp = sparsify(p, path="unstructured")
    assert has_eval_fusions(fp)
    with torch.no_grad():
        torch.testing.assert_close(fp(x, e), p(x, e), rtol=1e-5, atol=1e-6)
        # a float64 residual: out += r keeps float32 (as eager PyTorch does), computed unfused
        got, ref = fp(x, e.double()), p(x, e.double())
        assert got.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        # a broadcast residual
        torch.testing.assert_close(fp(x, e[:1, :, :1]), p(x, e[:1, :, :1]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fuse"):
        sparsify(p, fuse="yes")


@pytest.mark.parametrize("path", ["dense", "structured"])
def test_default_fusions_fold_into_dense_and_structured_layers(path, monkeypatch):
    masked = _model("vgg16")
    if path == "structured":
        masked = apply_masks(masked, magnitude_masks(masked, 0.5, structure="channels"))
    fast = sparsify(masked, path=path)
    calls = _count_bn_calls(monkeypatch)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = masked(x)
        n = len(calls)
        torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-5)
    assert n > 0 and len(calls) == n  # no BatchNorm ran in the fused forward


def _scripted(model):
    """Whether the model's last no_grad call could have run a TorchScript trace."""
    runner = model.__dict__["forward"].runner
    return runner is not None and any(t is not False for t in runner.traces.values())


def _twice(fast, ref, x):
    """Calls ``fast`` three times (the second makes the trace, the third runs it) against ``ref``."""
    for _ in range(3):
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-5)


def test_default_fusions_run_a_torchscript_trace_that_follows_state_changes():
    from apb_sparse.fuse import use_torchscript

    masked = _model("resnet18")
    fast, plain = sparsify(masked), sparsify(masked, fuse=False)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        _twice(fast, plain, x)
        assert _scripted(fast)
        # the trace is exact: the same op calls as the fused Python code
        prev = use_torchscript(False)
        try:
            python_out = fast(x)
        finally:
            use_torchscript(prev)
        assert torch.equal(fast(x), python_out)
        # in-place updates, replaced parameters, changed attributes and modules invalidate it
        for f in (fast, plain):
            f.layer1[0].bn1.running_var.mul_(1.5)
        _twice(fast, plain, x)
        for f in (fast, plain):
            f.layer2[0].bn2.weight = nn.Parameter(torch.full((128,), 0.25))
        _twice(fast, plain, x)
        for f in (fast, plain):
            f.layer3[0].bn1.eps = 0.5
        _twice(fast, plain, x)
        with torch.no_grad():
            for f in (fast, plain):
                f.layer4[1].conv2.values.mul_(-1)
        _twice(fast, plain, x)
        for f in (fast, plain):
            f.layer2[1].relu2 = nn.Tanh()
        _twice(fast, plain, x)
        assert _scripted(fast)
        # another input shape gets its own trace; a hook makes every call run in Python
        _twice(fast, plain, torch.rand(1, 3, 32, 32))
        assert len(fast.forward.runner.traces) == 2
        calls = []
        fast.layer1[0].conv1.register_forward_hook(lambda m, i, o: calls.append(1))
        plain.layer1[0].conv1.register_forward_hook(lambda m, i, o: calls.append(1))
        _twice(fast, plain, x)
        assert len(calls) == 6
    # grad mode: never the trace (autograd through the model's own modules)
    fast2 = sparsify(masked)
    xg = x.clone().requires_grad_()
    for _ in range(3):
        fast2(xg).sum().backward()
    assert fast2.forward.runner is None
    with pytest.raises(TypeError, match="enable"):
        use_torchscript(1)
    # the once-only check of a trace: exact, NaN only against NaN
    from apb_sparse.fuse import _same
    nan = float("nan")
    assert _same((torch.tensor([1.0, nan]),), (torch.tensor([1.0, nan]),))
    assert not _same(torch.tensor([0.0]), torch.tensor([nan]))
    assert not _same(torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.float64))
    assert not _same({"y": torch.ones(1)}, {"y": torch.ones(1), "z": torch.ones(1)})


def test_default_fusions_trace_copies_and_unusual_outputs(tmp_path):
    import copy

    masked = _model("resnet18")
    fast, plain = sparsify(masked), sparsify(masked, fuse=False)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        _twice(fast, plain, x)
    clone = copy.deepcopy(fast)
    assert clone.forward.runner is None  # traces are not copied: the copy traces its own
    torch.save(fast, tmp_path / "m.pt")
    with torch.inference_mode():
        _twice(clone, plain, x)
        assert _scripted(clone)
        loaded = torch.load(tmp_path / "m.pt", weights_only=False)
        _twice(loaded, plain, x)  # its tensors are inference tensors: folded at every call
        assert not _scripted(loaded)

    class Dict(nn.Module):  # a dict output with a non-tensor entry cannot be traced: Python path
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            return {"y": y, "n": 3}

    m = Dict().eval()
    s = sparsify(m)
    with torch.no_grad():
        for _ in range(3):
            out = s(torch.rand(1, 3, 8, 8))
            assert out["n"] == 3 and out["y"].shape == (1, 4, 8, 8)


def test_default_fusions_stop_tracing_a_model_that_keeps_changing():
    masked = _model("resnet18")
    fast, plain = sparsify(masked), sparsify(masked, fuse=False)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        for i in range(12):
            for f in (fast, plain):
                f.layer1[0].bn1.running_var.mul_(1.01)
            # three calls per state (the first refreshes the BatchNorm fold, the third would trace)
            for _ in range(3):
                torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
    runner = fast.forward.runner
    assert runner.disabled and runner.made <= 2 * 4 + 1 and runner.served == 0
