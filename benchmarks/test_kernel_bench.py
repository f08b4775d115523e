"""pytest-benchmark micro-benchmarks of the CPU kernel: single conv layers and whole ResNet-18.

Run (timed; groups pair dense torch with our sparse kernel on the same layer and batch):

    python -m pytest benchmarks --benchmark-only --benchmark-json benchmarks/results/bench_kernel.json

Each group holds the dense layer, the sparse kernel with the best ISA, every other ISA the CPU
supports, and the sparse kernel without input-channel blocking: compare within a group (the
`--benchmark-compare` / `--benchmark-group-by=group` views), never across runs on a busy machine.
CI only checks that everything collects and runs once, on tiny sizes:

    python -m pytest benchmarks --benchmark-disable -q
"""
import pytest
import torch
import torch.nn.functional as F

import apb_sparse
from apb_sparse import ops

pytest.importorskip("apb_sparse._C")

# (channels, map size, out channels, stride): the 3x3 convolutions of CIFAR ResNet-18.
LAYERS = [(64, 32, 64, 1), (128, 16, 128, 1), (256, 8, 256, 1), (512, 4, 512, 1), (128, 16, 256, 2)]
SPARSITIES = [0.9, 0.95, 0.99]
BATCHES = [1, 32]
VARIANTS = ["dense", "sparse"] + [f"sparse_{isa}" for isa in ops.supported_isas()[:-1]] + ["sparse_noblock"]


def _disabled(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


def _sparse_weight(o, c, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, c, 3, 3, generator=g)
    return w * (torch.rand(o, c, 3, 3, generator=g) >= sparsity).float()


def _configured(variant, fn):
    """fn run under the kernel setting the variant names (ISA cap, channel blocking)."""
    if variant.startswith("sparse_") and variant != "sparse_noblock":
        isa = variant[len("sparse_"):]

        def call():
            with ops.kernel_config(isa=isa):
                return fn()
        return call
    if variant == "sparse_noblock":
        def call():
            with ops.kernel_config(channel_blocking=False):
                return fn()
        return call
    return fn


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: f"{l[0]}to{l[2]}_{l[1]}x{l[1]}_s{l[3]}")
def test_conv_layer(benchmark, request, layer, batch, sparsity, variant):
    c, hw, o, stride = layer
    if _disabled(request.config):
        # Collect-and-run-once check (CI): every variant once, on one tiny layer.
        if layer != LAYERS[0] or batch != BATCHES[0] or sparsity != SPARSITIES[0]:
            pytest.skip("one layer per variant is enough for the collect-and-run-once check")
        c, hw, o = 16, 8, 16
    torch.manual_seed(0)
    x = torch.randn(batch, c, hw, hw)
    w = _sparse_weight(o, c, sparsity)
    b = torch.randn(o)
    v, rp, ci = ops.pack_csr(w)
    if variant == "dense":
        fn = lambda: F.conv2d(x, w, b, stride, 1)  # noqa: E731
    else:
        fn = _configured(variant, lambda: ops.sparse_conv2d(x, v, rp, ci, w.shape, b, stride, 1))
    ref = F.conv2d(x, w, b, stride, 1)
    torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-4)  # correctness before timing
    benchmark.group = f"conv {c}->{o} {hw}x{hw} s{stride} b{batch} sparsity {sparsity}"
    benchmark.extra_info.update(isa=ops.kernel_options()["isa"], threads=torch.get_num_threads(),
                                dense_macs=batch * o * c * 9 * ((hw + stride - 1) // stride) ** 2,
                                nonzeros=int(v.numel()))
    with torch.inference_mode():
        benchmark(fn)


@pytest.mark.parametrize("variant", ["dense", "sparse", "sparse_noblock"])
@pytest.mark.parametrize("mask", ["us@0.9", "us@0.95", "us@0.99", "global@0.9", "global@0.95", "global@0.99"])
@pytest.mark.parametrize("batch", BATCHES)
def test_resnet18(benchmark, request, batch, mask, variant):
    from apb_sparse.models import get_model

    if _disabled(request.config):
        # Building and sparsifying ResNet-18 takes ~10 s: too slow for the CI check (the conv layer
        # cases above run the same kernels; tests/test_sparsify.py covers the conversion).
        pytest.skip("whole-model benchmark skipped with --benchmark-disable")
    torch.manual_seed(0)
    dense = get_model("resnet18").eval()
    kind, _, value = mask.partition("@")
    masks = apb_sparse.magnitude_masks(dense, float(value), scope="global" if kind == "global" else "local")
    masked = apb_sparse.apply_masks(dense, masks)
    model = dense if variant == "dense" else apb_sparse.sparsify(masked)
    x = torch.rand(batch, 3, 32, 32)
    if variant != "dense":
        with torch.inference_mode():
            ref = masked(x)
            torch.testing.assert_close(model(x), ref, rtol=1e-3, atol=1e-3 * max(1.0, ref.abs().max().item()))
    benchmark.group = f"resnet18 b{batch} {mask}"
    benchmark.extra_info.update(isa=ops.kernel_options()["isa"], threads=torch.get_num_threads())
    with torch.inference_mode():
        benchmark(_configured(variant, lambda: model(x)))
