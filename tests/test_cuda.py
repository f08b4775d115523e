"""CUDA kernels: registered when the build had CUDA; on a GPU, equal to the CPU ops and the dense model.

The device-parametrised tests of test_ops.py (fuzz, opcheck, gradcheck) also run on cuda when a
GPU is present; this file adds what is specific to the CUDA build: registration (checked in CI
without a GPU), CUDA-vs-CPU agreement on random shapes, layouts and sizes, determinism, launch
limits, and the whole-model equivalence of ``sparsify(model).cuda()``.
"""
import copy
import random

import pytest
import torch
import torch.nn.functional as F

import apb_sparse
from apb_sparse import apply_masks, magnitude_masks, ops, sparsify
from apb_sparse.models import get_model

OPS = ["masked_conv2d", "masked_conv2d_backward_input", "sparse_conv2d", "sparse_conv2d_backward_input",
       "sparse_linear", "sparse_linear_backward_input"]

_CUDA_BUILT = ops.available() and getattr(apb_sparse.ops._C, "cuda_built", 0) == 1


def _has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"apb_sparse::{op}", "CUDA")


needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and _CUDA_BUILT and _has_cuda_kernel("sparse_conv2d")),
    reason="needs a CUDA device and an apb_sparse build with CUDA kernels")

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


@pytest.fixture(autouse=True)
def _exact_fp32():
    """cuDNN and cuBLAS default to TF32 for float32 on Ampere and later (about 1e-3 relative
    error); the dense references here must be exact float32."""
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


# ------------------------------------------------------------------------------------------------
# Registration (runs in CI, no GPU needed)


@pytest.mark.skipif(not _CUDA_BUILT, reason="apb_sparse was built without CUDA (CPU-only torch, no nvcc, "
                                            "or APB_SPARSE_NO_CUDA=1): no CUDA kernels to check")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_registered(op):
    assert _has_cuda_kernel(op), f"apb_sparse::{op} has no CUDA kernel although cuda_built == 1"


def test_cuda_kernels_built_whenever_a_toolkit_is_present():
    """setup.py must build the CUDA kernels when torch is a CUDA build and a toolkit with nvcc and
    cuda_runtime.h is found (as in CI): a silent CPU-only build would skip every CUDA check."""
    import os
    import shutil

    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if shutil.which("nvcc"):
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc")))))
    toolkit = any(r and os.path.exists(os.path.join(r, "include", "cuda_runtime.h")) and
                  os.path.exists(os.path.join(r, "bin", "nvcc")) for r in roots)
    if torch.version.cuda is None or not toolkit or os.environ.get("APB_SPARSE_NO_CUDA") == "1":
        pytest.skip("no CUDA build of torch or no CUDA toolkit here: CPU-only build expected")
    assert _CUDA_BUILT, "torch is a CUDA build and a CUDA toolkit exists, but apb_sparse was built without CUDA"


def test_cpu_kernels_registered():
    # Guard for the test above: the lookup must say True for a kernel that exists and False for one
    # that does not, otherwise it could not fail.
    if not ops.available():
        pytest.skip("extension not built")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"apb_sparse::{op}", "CPU")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("apb_sparse::sparse_conv2d", "XLA")


# ------------------------------------------------------------------------------------------------
# GPU: CUDA ops against the CPU ops


def _conv_case(rng: random.Random, dtype, n=None):
    groups = rng.choice([1, 1, 2, 3])
    cg = rng.randint(1, 6)
    og = rng.randint(1, 5)
    c, o = cg * groups, og * groups
    if rng.random() < 0.2:  # depthwise
        groups, c, o = c, c, c
    kh, kw = rng.choice([(1, 1), (3, 3), (3, 3), (5, 5), (2, 3), (1, 3), (7, 7)])
    stride = (rng.randint(1, 3), rng.randint(1, 3))
    dilation = (rng.randint(1, 3), rng.randint(1, 2))
    padding = (rng.randint(0, 3), rng.randint(0, 2))
    h = rng.randint(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 40)
    w = rng.randint(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 40)
    n = rng.choice([0, 1, 2, 5]) if n is None else n
    x = torch.randn(n, c, h, w, dtype=dtype)
    layout = rng.choice(["contiguous", "channels_last", "strided"])
    weight = torch.randn(o, c // groups, kh, kw, dtype=dtype)
    mask = (torch.rand(weight.shape) >= rng.choice([0.0, 0.5, 0.9, 0.99, 1.0])).to(dtype)
    if o > 1 and rng.random() < 0.3:
        mask[rng.randrange(o)] = 0  # an empty output channel
    bias = torch.randn(o, dtype=dtype) if rng.random() < 0.7 else None
    return x, layout, weight, mask, bias, (list(stride), list(padding), list(dilation), groups)


def _to_cuda(x, layout):
    xc = x.cuda()
    if layout == "channels_last":
        xc = xc.to(memory_format=torch.channels_last)
    elif layout == "strided":
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device="cuda")
        wide[..., ::2] = xc
        xc = wide[..., ::2]
    return xc


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(4))
def test_conv_ops_cuda_match_cpu(dtype, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    A = torch.ops.apb_sparse
    for _ in range(30):
        x, layout, weight, mask, bias, args = _conv_case(rng, dtype)
        xc = _to_cuda(x, layout)
        wc, mc = weight.cuda(), mask.cuda()
        bc = bias.cuda() if bias is not None else None
        ref = A.masked_conv2d(x, weight, mask, bias, *args)
        got = A.masked_conv2d(xc, wc, mc, bc, *args)
        assert got.is_contiguous() and got.shape == ref.shape
        torch.testing.assert_close(got.cpu(), ref, **TOL[dtype])
        v, rp, ci = ops.pack_csr(weight, mask)
        got_s = A.sparse_conv2d(xc, v.cuda(), rp.cuda(), ci.cuda(), list(weight.shape), bc, *args)
        torch.testing.assert_close(got_s.cpu(), ref, **TOL[dtype])

        gout = torch.randn_like(ref)
        goc = _to_cuda(gout, layout)
        ref_gi = A.masked_conv2d_backward_input(gout, weight, mask, list(x.shape), *args)
        got_gi = A.masked_conv2d_backward_input(goc, wc, mc, list(x.shape), *args)
        assert got_gi.is_contiguous()
        torch.testing.assert_close(got_gi.cpu(), ref_gi, **TOL[dtype])
        got_gs = A.sparse_conv2d_backward_input(goc, v.cuda(), rp.cuda(), ci.cuda(), list(weight.shape),
                                                list(x.shape), *args)
        torch.testing.assert_close(got_gs.cpu(), ref_gi, **TOL[dtype])


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv_autograd_cuda_matches_dense(dtype):
    rng = random.Random(7)
    torch.manual_seed(7)
    for _ in range(15):
        x, layout, weight, mask, bias, (stride, padding, dilation, groups) = _conv_case(rng, dtype, n=2)
        xc = _to_cuda(x, layout)
        wc, mc = weight.cuda(), mask.cuda()
        bc = bias.cuda() if bias is not None else None
        xr, wr, mr = (t.detach().clone().requires_grad_() for t in (xc, wc, mc))
        ref = F.conv2d(xr, wr * mr, bc, stride, padding, dilation, groups)
        gout = torch.randn_like(ref)
        ref.backward(gout)
        xk, wk, mk = (t.detach().clone().requires_grad_() for t in (xc, wc, mc))
        got = ops.masked_conv2d(xk, wk, mk, bc, stride, padding, dilation, groups)
        got.backward(gout)
        torch.testing.assert_close(got, ref, **TOL[dtype])
        for a, b in ((xk, xr), (wk, wr), (mk, mr)):
            torch.testing.assert_close(a.grad, b.grad, **TOL[dtype])
        v, rp, ci = ops.pack_csr(wc, mc)
        xs = xc.detach().clone().requires_grad_()
        ops.sparse_conv2d(xs, v, rp, ci, weight.shape, bc, stride, padding, dilation, groups).backward(gout)
        torch.testing.assert_close(xs.grad, xr.grad, **TOL[dtype])


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_cuda_matches_cpu(dtype):
    rng = random.Random(3)
    torch.manual_seed(3)
    A = torch.ops.apb_sparse
    for _ in range(25):
        i, o = rng.randint(1, 300), rng.randint(1, 70)
        lead = rng.choice([(), (0,), (1,), (7,), (3, 4), (129,)])
        x = torch.randn(*lead, i, dtype=dtype)
        weight = torch.randn(o, i, dtype=dtype) * (torch.rand(o, i) >= rng.choice([0.0, 0.5, 0.95, 1.0]))
        bias = torch.randn(o, dtype=dtype) if rng.random() < 0.5 else None
        v, rp, ci = ops.pack_csr(weight)
        ref = A.sparse_linear(x, v, rp, ci, i, bias)
        xc = x.cuda()
        if x.dim() == 2 and rng.random() < 0.5:
            xc = x.t().contiguous().cuda().t()  # non-contiguous
        got = A.sparse_linear(xc, v.cuda(), rp.cuda(), ci.cuda(), i, bias.cuda() if bias is not None else None)
        assert got.shape == ref.shape
        torch.testing.assert_close(got.cpu(), ref, **TOL[dtype])
        gout = torch.randn_like(ref)
        ref_gi = A.sparse_linear_backward_input(gout, v, rp, ci, i)
        got_gi = A.sparse_linear_backward_input(gout.cuda(), v.cuda(), rp.cuda(), ci.cuda(), i)
        assert got_gi.shape == ref_gi.shape
        torch.testing.assert_close(got_gi.cpu(), ref_gi, **TOL[dtype])


@needs_gpu
def test_cuda_batch_zero_and_empty_weights():
    A = torch.ops.apb_sparse
    args = ([1, 1], [1, 1], [1, 1], 1)
    for n in (0, 3):
        x = torch.randn(n, 4, 7, 7, device="cuda")
        w = torch.randn(6, 4, 3, 3, device="cuda")
        b = torch.randn(6, device="cuda")
        for mask in (torch.zeros_like(w), torch.ones_like(w)):
            ref = F.conv2d(x.cpu(), (w * mask).cpu(), b.cpu(), 1, 1)
            got = A.masked_conv2d(x, w, mask, b, *args)
            assert got.shape == ref.shape
            torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)
            v, rp, ci = ops.pack_csr(w, mask)
            got = A.sparse_conv2d(x, v, rp, ci, list(w.shape), b, *args)
            torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)
            gi = A.sparse_conv2d_backward_input(torch.ones_like(got), v, rp, ci, list(w.shape), list(x.shape), *args)
            assert gi.shape == x.shape
    # zero output channels
    x = torch.randn(2, 4, 5, 5, device="cuda")
    w = torch.randn(0, 4, 3, 3, device="cuda")
    assert A.masked_conv2d(x, w, w, None, *args).shape == (2, 0, 5, 5)
    gi = A.masked_conv2d_backward_input(torch.randn(2, 0, 5, 5, device="cuda"), w, w, [2, 4, 5, 5], *args)
    assert torch.equal(gi, torch.zeros_like(gi))
    # linear with an all-zero weight: the bias
    v, rp, ci = ops.pack_csr(torch.zeros(5, 8, device="cuda"))
    b = torch.randn(5, device="cuda")
    torch.testing.assert_close(A.sparse_linear(torch.randn(3, 8, device="cuda"), v, rp, ci, 8, b), b.expand(3, 5))


@needs_gpu
def test_cuda_large_grid_and_row_counts():
    # Grid-stride loops and chunking: many output positions, more rows than gridDim.y allows
    # (70000 > 65535), and rows longer than one shared-memory chunk (9000 nonzeros > 128).
    torch.manual_seed(0)
    x = torch.randn(2, 3, 300, 301, device="cuda")
    w = torch.randn(9, 3, 3, 3, device="cuda")
    m = (torch.rand_like(w) > 0.3).float()
    ref = F.conv2d(x, w * m, None, 1, 1)
    torch.testing.assert_close(ops.masked_conv2d(x, w, m, None, 1, 1), ref, rtol=1e-4, atol=1e-4)
    x = torch.randn(1, 600, 4, 4, device="cuda")
    w = torch.randn(70000, 600, 1, 1, device="cuda")  # 70000 rows > 65535 grid rows
    m = (torch.rand_like(w) > 0.99).float()
    ref = F.conv2d(x, w * m)
    torch.testing.assert_close(ops.masked_conv2d(x, w, m), ref, rtol=1e-4, atol=1e-4)
    w = torch.randn(4, 1000, 3, 3, device="cuda")  # 9000 nonzeros per row: many chunks
    x = torch.randn(1, 1000, 6, 6, device="cuda")
    ref = F.conv2d(x, w, None, 1, 1)
    v, rp, ci = ops.pack_csr(w)
    torch.testing.assert_close(ops.sparse_conv2d(x, v, rp, ci, w.shape, None, 1, 1), ref, rtol=1e-3, atol=1e-3)


@needs_gpu
def test_cuda_ops_are_deterministic():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 17, 17, device="cuda")
    w = torch.randn(32, 8, 3, 3, device="cuda")
    m = (torch.rand_like(w) > 0.7).float()
    go = torch.randn(4, 32, 9, 9, device="cuda")
    args = ([2, 2], [1, 1], [1, 1], 2)
    v, rp, ci = ops.pack_csr(w, m)
    A = torch.ops.apb_sparse
    for f in (lambda: A.masked_conv2d(x, w, m, None, *args),
              lambda: A.sparse_conv2d(x, v, rp, ci, list(w.shape), None, *args),
              lambda: A.masked_conv2d_backward_input(go, w, m, list(x.shape), *args),
              lambda: A.sparse_conv2d_backward_input(go, v, rp, ci, list(w.shape), list(x.shape), *args)):
        first = f()
        for _ in range(3):
            assert torch.equal(f(), first)


@needs_gpu
def test_cuda_forward_does_not_synchronise():
    # Forward and backward ops read CSR contents only on the device: no host sync allowed, so they
    # can be captured in CUDA graphs.
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9, device="cuda")
    w = torch.randn(16, 8, 3, 3, device="cuda")
    m = (torch.rand_like(w) > 0.5).float()
    v, rp, ci = ops.pack_csr(w, m)
    A = torch.ops.apb_sparse
    A.sparse_conv2d(x, v, rp, ci, list(w.shape), None, [1, 1], [1, 1], [1, 1], 1)  # warm up
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = A.sparse_conv2d(x, v, rp, ci, list(w.shape), None, [1, 1], [1, 1], [1, 1], 1)
        A.masked_conv2d(x, w, m, None, [1, 1], [1, 1], [1, 1], 1)
        A.sparse_conv2d_backward_input(y, v, rp, ci, list(w.shape), list(x.shape), [1, 1], [1, 1], [1, 1], 1)
        A.masked_conv2d_backward_input(y, w, m, list(x.shape), [1, 1], [1, 1], [1, 1], 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_gpu
def test_cuda_malformed_csr_does_not_fault():
    # The CUDA ops do not validate CSR contents (that would need a host sync); a corrupt CSR must
    # still stay inside its arrays: the result is unspecified, but the CUDA context stays usable.
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, device="cuda")
    w = torch.randn(6, 4, 3, 3, device="cuda")
    v, rp, ci = ops.pack_csr(w)
    A = torch.ops.apb_sparse
    bad_ci = ci.clone()
    bad_ci[::7] = 10_000
    bad_ci[1] = -5
    bad_rp = rp.clone()
    bad_rp[2] = -100
    bad_rp[3] = 1_000_000
    args = ([1, 1], [1, 1], [1, 1], 1)
    for r, c in ((rp, bad_ci), (bad_rp, ci), (bad_rp, bad_ci)):
        y = A.sparse_conv2d(x, v, r, c, list(w.shape), None, *args)
        A.sparse_conv2d_backward_input(y, v, r, c, list(w.shape), list(x.shape), *args)
        xl = torch.randn(3, 36, device="cuda")
        yl = A.sparse_linear(xl, v, r, c, 36, None)
        A.sparse_linear_backward_input(yl, v, r, c, 36)
    torch.cuda.synchronize()
    torch.testing.assert_close(A.sparse_conv2d(x, v, rp, ci, list(w.shape), None, *args),
                               F.conv2d(x, w, None, 1, 1), rtol=1e-4, atol=1e-4)


@needs_gpu
def test_cuda_rejects_mixed_devices():
    x = torch.randn(1, 4, 6, 6, device="cuda")
    w = torch.randn(6, 4, 3, 3)
    v, rp, ci = ops.pack_csr(w)
    with pytest.raises(RuntimeError, match="input's device"):
        torch.ops.apb_sparse.sparse_conv2d(x, v, rp, ci, list(w.shape), None, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="input's device"):
        torch.ops.apb_sparse.masked_conv2d(x, w.cuda(), w, None, [1, 1], [1, 1], [1, 1], 1)


# ------------------------------------------------------------------------------------------------
# GPU: whole model


@needs_gpu
@pytest.mark.parametrize("path", ["unstructured", "auto"])
def test_sparsified_resnet18_cuda_equals_masked_dense(path):
    torch.manual_seed(0)
    model = get_model("resnet18").eval()
    for mod in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    masked = apply_masks(model, magnitude_masks(model, 0.9))
    sparse = sparsify(masked, path=path).cuda()
    dense = copy.deepcopy(masked).cuda()
    x = torch.rand(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        ref = dense(x)
        got = sparse(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # Gradient to the input (white-box attacks on the deployed model).
    xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    dense(xr).logsumexp(1).sum().backward()
    sparse(xs).logsumexp(1).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-3, atol=1e-4)
