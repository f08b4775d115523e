"""Property-based fuzzing of the layers against the dense reference (hypothesis).

Every drawn case builds a dense ``nn.Conv2d`` / ``nn.Linear`` (or a small model), prunes it with a
random mask, converts it (SparseConv2d, MaskedConv2d, ChannelSparseConv2d, SparseLinear,
``sparsify``) and compares output and input gradient with the dense layer holding
``weight * mask``: random shapes, stride, padding (ints, "same", "valid", every padding_mode),
dilation, groups, sparsity 0..1, batch 0-4, 8, 9, 33 (the last ones take the images-in-lanes
layout), unbatched inputs, channels_last / strided inputs, the fused ReLU, residual and 2x2 max
pool.

The default run is a few hundred deterministic cases (``derandomize``).  Long mode:
``APB_FUZZ_LONG=N python -m pytest tests/test_fuzz.py -s`` draws about N cases in all (split over
the tests below like the default run) with fresh randomness; the counts are printed.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from apb_sparse import ops  # noqa: E402
from apb_sparse.nn import ChannelSparseConv2d, MaskedConv2d, SparseConv2d, SparseLinear  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.available(), reason="extension not built")

LONG = int(os.environ.get("APB_FUZZ_LONG", "0") or 0)
# Share of the cases per test (default counts: 240 + 60 + 30 = 330).
DEFAULT = {"conv": 240, "linear": 60, "model": 30}
TOTAL_DEFAULT = sum(DEFAULT.values())
COUNTS = {"conv": 0, "linear": 0, "model": 0}


def _settings(name):
    n = DEFAULT[name] if not LONG else max(1, round(LONG * DEFAULT[name] / TOTAL_DEFAULT))
    return settings(max_examples=n, deadline=None, database=None, derandomize=not LONG,
                    suppress_health_check=list(HealthCheck), print_blob=True)


TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-9, atol=1e-9)}
MODES = ["zeros", "zeros", "reflect", "replicate", "circular"]


@st.composite
def conv_cases(draw):
    layer = draw(st.sampled_from(["SparseConv2d", "SparseConv2d", "MaskedConv2d", "ChannelSparseConv2d"]))
    groups = 1 if layer == "ChannelSparseConv2d" else draw(st.sampled_from([1, 1, 2, 3]))
    cin, cout = draw(st.integers(1, 4)) * groups, draw(st.integers(1, 4)) * groups
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    mode = draw(st.sampled_from(MODES))
    kind = draw(st.sampled_from(["int", "int", "int", "same", "valid"]))
    if kind == "same" and stride != (1, 1):
        kind = "int"
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3))) if kind == "int" else kind
    pads = []
    for i in range(2):
        if padding == "same":
            total = dilation[i] * (k[i] - 1)
            pads.append((total // 2, total - total // 2))
        elif padding == "valid":
            pads.append((0, 0))
        else:
            pads.append((padding[i], padding[i]))
    sizes = []
    for i in range(2):
        extent = dilation[i] * (k[i] - 1) + 1
        lo = max(1, extent - sum(pads[i]), max(pads[i]) + 1)  # reflect needs padding < size
        # now and then wide enough for 16-wide output rows (the kw-shifted layout's auto mode)
        sizes.append(draw(st.integers(lo, lo + 7)) if draw(st.integers(0, 3)) else draw(st.integers(lo, lo + 17)))
    sparsity = draw(st.sampled_from([0.0, 1.0, None]))
    if sparsity is None:
        sparsity = draw(st.floats(0.0, 1.0, allow_subnormal=False))
    return dict(layer=layer, groups=groups, cin=cin, cout=cout, k=k, stride=stride, dilation=dilation, mode=mode,
                padding=padding, size=tuple(sizes), sparsity=sparsity,
                # 0-3, and batches that take the images-in-lanes layout (>= one vector of images:
                # 4 doubles / 8 floats), with partial last chunks
                batch=draw(st.sampled_from([0, 1, 2, 3, 4, 8, 9, 33])),
                unbatched=draw(st.booleans()) and draw(st.booleans()),
                layout=draw(st.sampled_from(["contiguous", "contiguous", "channels_last", "strided"])),
                bias=draw(st.booleans()), dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                relu=layer == "SparseConv2d" and draw(st.booleans()),
                residual=layer == "SparseConv2d" and draw(st.booleans()),
                # a 2x2 max pool after the epilogue (deploy's fused_pool), where the output is 2x2 or more
                pool=layer == "SparseConv2d" and draw(st.booleans()),
                # kw-shifted input layout: auto (default), forced wherever the geometry allows, off
                shifted=draw(st.sampled_from([1, 2, 0])),
                # lanes kernel's 8-pixel blocks: back to back per row (default) or block by block
                blocks_inner=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def _input(shape, layout, dtype, gen):
    if layout == "strided" and len(shape) >= 2:
        wide = list(shape)
        wide[-1] *= 2
        return torch.randn(wide, dtype=dtype, generator=gen)[..., ::2]
    x = torch.randn(shape, dtype=dtype, generator=gen)
    if layout == "channels_last" and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    return x


def _compare(layer_fn, ref_fn, x, dtype, extra=()):
    xa = x.detach().clone().requires_grad_(True)
    xb = x.detach().clone().requires_grad_(True)
    got, want = layer_fn(xa, *extra), ref_fn(xb, *extra)
    torch.testing.assert_close(got, want, **TOL[dtype])
    if want.numel() and x.numel():
        gout = torch.randn_like(want)
        (ga,) = torch.autograd.grad(got, xa, gout, allow_unused=True)
        (gb,) = torch.autograd.grad(want, xb, gout, allow_unused=True)
        ga = torch.zeros_like(x) if ga is None else ga
        gb = torch.zeros_like(x) if gb is None else gb
        torch.testing.assert_close(ga, gb, **TOL[dtype])


@_settings("conv")
@given(conv_cases())
def test_fuzz_conv_layers(case):
    COUNTS["conv"] += 1
    with ops.kernel_config(shifted_layout=case["shifted"], lanes_blocks_inner=case["blocks_inner"]):
        _fuzz_conv_layer(case)


def _fuzz_conv_layer(case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = case["dtype"]
    conv = nn.Conv2d(case["cin"], case["cout"], case["k"], case["stride"], case["padding"], case["dilation"],
                     case["groups"], case["bias"], case["mode"], dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, dtype=dtype, generator=gen))
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(conv.bias.shape, dtype=dtype, generator=gen))
    mask = (torch.rand(conv.weight.shape, generator=gen) >= case["sparsity"]).to(dtype)
    ref = nn.Conv2d(case["cin"], case["cout"], case["k"], case["stride"], case["padding"], case["dilation"],
                    case["groups"], case["bias"], case["mode"], dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(conv.weight * mask)
        if conv.bias is not None:
            ref.bias.copy_(conv.bias)
    layer = {"SparseConv2d": SparseConv2d, "MaskedConv2d": MaskedConv2d,
             "ChannelSparseConv2d": ChannelSparseConv2d}[case["layer"]].from_dense(conv, mask)
    shape = (case["cin"], *case["size"]) if case["unbatched"] else (case["batch"], case["cin"], *case["size"])
    x = _input(shape, case["layout"], dtype, gen)
    if case["relu"] or case["residual"] or case["pool"]:
        layer.fused_relu = case["relu"]
        out_shape = ref(x).shape
        pool = case["pool"] and min(out_shape[-2:]) >= 2
        layer.fused_pool = pool
        extra = (torch.randn(out_shape, dtype=dtype, generator=gen),) if case["residual"] else ()

        def ref_fn(t, *r):
            y = ref(t) + r[0] if r else ref(t)
            y = torch.relu(y) if case["relu"] else y
            return F.max_pool2d(y, 2, 2) if pool else y

        _compare(layer, ref_fn, x, dtype, extra)
        if pool:  # without gradients the kernel pools in its store (with them, F.max_pool2d after it)
            with torch.no_grad():
                torch.testing.assert_close(layer(x, *extra), ref_fn(x, *extra), **TOL[dtype])
    else:
        _compare(layer, ref, x, dtype)


@st.composite
def linear_cases(draw):
    lead = draw(st.sampled_from([(), (0,), (1,), (3,), (2, 3), (0, 2)]))
    return dict(inf=draw(st.integers(0, 12)), outf=draw(st.integers(0, 12)), lead=lead,
                sparsity=draw(st.sampled_from([0.0, 1.0, 0.5, 0.9])), bias=draw(st.booleans()),
                layout=draw(st.sampled_from(["contiguous", "strided"])),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])), seed=draw(st.integers(0, 2**31 - 1)))


@_settings("linear")
@given(linear_cases())
def test_fuzz_sparse_linear(case):
    COUNTS["linear"] += 1
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = case["dtype"]
    lin = nn.Linear(case["inf"], case["outf"], case["bias"], dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, dtype=dtype, generator=gen))
        lin.weight.mul_((torch.rand(lin.weight.shape, generator=gen) >= case["sparsity"]).to(dtype))
    x = _input((*case["lead"], case["inf"]), case["layout"], dtype, gen)
    _compare(SparseLinear.from_dense(lin), lin, x, dtype)


class _Block(nn.Module):
    """conv-bn-relu-conv-bn + shortcut, relu: what fuse / sparsify see in ResNets."""

    def __init__(self, c, mode):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False, padding_mode=mode)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


@st.composite
def model_cases(draw):
    # batches of 5 and 9 take the images-in-lanes layout in float64 (4 images per vector), where
    # deploy's conv pairs run chunk by chunk
    return dict(c=draw(st.integers(1, 6)), size=draw(st.integers(3, 9)), batch=draw(st.sampled_from([1, 2, 3, 5, 9])),
                mode=draw(st.sampled_from(MODES)), sparsity=draw(st.sampled_from([0.0, 0.5, 0.8, 0.95, 1.0])),
                layout=draw(st.sampled_from(["auto", "unstructured", "filter"])),
                form=draw(st.sampled_from(["sparsify", "deploy"])), pool=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


@_settings("model")
@given(model_cases())
def test_fuzz_small_models(case):
    from apb_sparse import deploy, sparsify

    COUNTS["model"] += 1
    torch.manual_seed(case["seed"])
    c = case["c"]
    # deploy swaps the 2x2 max pool (odd maps included) for MaxPool2x2 and its one-pass op
    pool = [nn.MaxPool2d(2, 2)] if case["pool"] else []
    model = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, stride=2), nn.ReLU(), _Block(c, case["mode"]), *pool,
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 4)).double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    masks = {name: (torch.rand_like(m.weight) >= case["sparsity"]).double() for name, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))}
    with torch.no_grad():
        for name, m in model.named_modules():
            if name in masks:
                m.weight.mul_(masks[name])
    x = torch.randn(case["batch"], 3, case["size"], case["size"], dtype=torch.float64)
    if case["form"] == "sparsify":
        converted = sparsify(model, masks, layout=case["layout"])
    else:  # the snapshot: BatchNorm folded, ReLU / residual fused, a TorchScript graph for x's shape
        converted = deploy(model, x, masks=masks, layout=case["layout"])
    _compare(converted, model, x, torch.float64)
    if case["form"] == "deploy":
        with torch.no_grad():  # the TorchScript graph, and the Python graph for another shape
            torch.testing.assert_close(converted(x), model(x), **TOL[torch.float64])
            x2 = torch.randn(case["batch"] + 1, 3, case["size"], case["size"], dtype=torch.float64)
            torch.testing.assert_close(converted(x2), model(x2), **TOL[torch.float64])


def test_fuzz_counts(capsys):
    """Runs last in this file (pytest keeps file order): prints how many cases were drawn."""
    with capsys.disabled():
        print(f"\nfuzz cases: {COUNTS} total {sum(COUNTS.values())}" + (f" (APB_FUZZ_LONG={LONG})" if LONG else ""))
    if not LONG and all(COUNTS.values()):
        assert sum(COUNTS.values()) >= TOTAL_DEFAULT
