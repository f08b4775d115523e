"""PyTorch's own OpInfo samples of ``nn.functional.conv2d`` through the sparse and masked layers.

Each sample (weight, bias, stride, padding incl. "same"/"valid", dilation, groups, batched and
unbatched inputs) becomes an ``nn.Conv2d``, is converted with ``SparseConv2d.from_dense`` and
``MaskedConv2d.from_dense`` (dense and pruned) and deployed with ``apb_sparse.deploy``, and must give F.conv2d's output and input gradient.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apb_sparse import deploy, ops
from apb_sparse.nn import MaskedConv2d, SparseConv2d

pytest.importorskip("expecttest")  # torch.testing._internal needs it
pytestmark = pytest.mark.skipif(not ops.available(), reason="extension not built")

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}
ARG_NAMES = ("bias", "stride", "padding", "dilation", "groups")


def _samples(dtype):
    from torch.testing._internal.common_methods_invocations import op_db

    op = next(o for o in op_db if o.name == "nn.functional.conv2d")
    return list(op.sample_inputs("cpu", dtype, requires_grad=True))


def _conv_args(sample):
    weight = sample.args[0]
    kw = dict(zip(ARG_NAMES, sample.args[1:]))
    kw.update(sample.kwargs)
    return weight.detach(), kw


def _as_module(weight, kw):
    groups = kw.get("groups", 1)
    bias = kw.get("bias")
    conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=kw.get("stride", 1),
                     padding=kw.get("padding", 0), dilation=kw.get("dilation", 1), groups=groups,
                     bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def _output_and_input_grad(fn, x, gout):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (gx,) = torch.autograd.grad(out, x, gout)
    return out.detach(), gx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opinfo_conv2d_samples(dtype):
    torch.manual_seed(0)
    samples = _samples(dtype)
    assert len(samples) == 30
    passed, failures = 0, []
    for i, sample in enumerate(samples):
        weight, kw = _conv_args(sample)
        bias = kw.get("bias")
        conv_kw = {k: v for k, v in kw.items() if k != "bias"}
        x = sample.input.detach()
        ref_out = F.conv2d(x, weight, bias.detach() if bias is not None else None, **conv_kw)
        gout = torch.randn_like(ref_out)
        mask = (torch.rand_like(weight) > 0.6).to(dtype)  # below the dense-kernel density: sparse path
        variants = {
            "SparseConv2d": (SparseConv2d.from_dense(_as_module(weight, kw)), weight),
            "SparseConv2d pruned": (SparseConv2d.from_dense(_as_module(weight, kw), mask), weight * mask),
            "MaskedConv2d": (MaskedConv2d.from_dense(_as_module(weight, kw)), weight),
            "MaskedConv2d pruned": (MaskedConv2d.from_dense(_as_module(weight, kw), mask), weight * mask),
        }
        # The deployment snapshot of the pruned layer (its TorchScript graph under no_grad).
        deployed = deploy(nn.Sequential(MaskedConv2d.from_dense(_as_module(weight, kw), mask)).eval(), x,
                          layout="unstructured")
        with torch.no_grad():
            ref = F.conv2d(x, weight * mask, bias.detach() if bias is not None else None, **conv_kw)
            try:
                torch.testing.assert_close(deployed(x), ref, **TOL[dtype])
            except Exception as exc:
                failures.append(f"sample {i} deployed (no_grad): {type(exc).__name__}: {str(exc)[:300]}")
        variants["deployed pruned"] = (deployed, weight * mask)
        ok = True
        for name, (layer, w) in variants.items():
            conv_b = bias.detach() if bias is not None else None
            want = _output_and_input_grad(lambda t: F.conv2d(t, w, conv_b, **conv_kw), x, gout)
            try:
                got = _output_and_input_grad(layer, x, gout)
                torch.testing.assert_close(got[0], want[0], **TOL[dtype])
                torch.testing.assert_close(got[1], want[1], **TOL[dtype])
            except Exception as exc:  # collected: the report lists every failing sample
                ok = False
                failures.append(f"sample {i} {name}: input {tuple(x.shape)} weight {tuple(weight.shape)} "
                                f"{conv_kw}: {type(exc).__name__}: {str(exc)[:300]}")
        passed += ok
    assert not failures, f"{passed}/{len(samples)} samples passed:\n" + "\n".join(failures)
    assert passed == len(samples)
