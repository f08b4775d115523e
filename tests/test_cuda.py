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


def _malformed_csrs(rp, ci):
    bad_ci = ci.clone()
    bad_ci[::7] = 10_000
    bad_ci[1] = -5
    bad_rp = rp.clone()
    bad_rp[2] = -100
    bad_rp[3] = 1_000_000
    start = rp.clone()
    start[0] = 1  # row_ptr[0] != 0 (the review's example)
    return [(rp, bad_ci, "col_idx entry"), (bad_rp, ci, "non-decreasing"), (bad_rp, bad_ci, "non-decreasing"),
            (start, ci, "start at 0")]


@needs_gpu
def test_cuda_validates_csr_like_cpu():
    # Outside graph capture the CUDA ops refuse a malformed CSR with the CPU op's message.
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, device="cuda")
    w = torch.randn(6, 4, 3, 3, device="cuda")
    v, rp, ci = ops.pack_csr(w)
    A = torch.ops.apb_sparse
    args = ([1, 1], [1, 1], [1, 1], 1)
    y = torch.randn(2, 6, 6, 6, device="cuda")
    for r, c, msg in _malformed_csrs(rp, ci):
        for f in (lambda: A.sparse_conv2d(x, v, r, c, list(w.shape), None, *args),
                  lambda: A.sparse_conv2d_backward_input(y, v, r, c, list(w.shape), list(x.shape), *args),
                  lambda: A.sparse_linear(torch.randn(3, 36, device="cuda"), v, r, c, 36, None),
                  lambda: A.sparse_linear_backward_input(torch.randn(3, 6, device="cuda"), v, r, c, 36)):
            with pytest.raises(RuntimeError, match=msg):
                f()
        # ... and so does the CPU op: same semantics on both devices.
        with pytest.raises(RuntimeError, match=msg):
            A.sparse_conv2d(x.cpu(), v.cpu(), r.cpu(), c.cpu(), list(w.shape), None, *args)
    # A column bound that differs per op: 36 taps is fine for the conv, not for a 30-feature linear.
    with pytest.raises(RuntimeError, match="out of range"):
        A.sparse_linear(torch.randn(3, 30, device="cuda"), v, rp, ci, 30, None)
    # The context is still usable and a valid CSR works.
    torch.testing.assert_close(A.sparse_conv2d(x, v, rp, ci, list(w.shape), None, *args),
                               F.conv2d(x, w, None, 1, 1), rtol=1e-4, atol=1e-4)


@needs_gpu
def test_cuda_csr_validation_follows_in_place_writes():
    # Validation verdicts are cached per (storage, version): an in-place write to a validated
    # row_ptr / col_idx must be validated again, not served from the cache.
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 6, device="cuda")
    w = torch.randn(6, 4, 3, 3, device="cuda")
    v, rp, ci = ops.pack_csr(w)
    A = torch.ops.apb_sparse
    args = ([1, 1], [1, 1], [1, 1], 1)
    A.sparse_conv2d(x, v, rp, ci, list(w.shape), None, *args)  # validated, cached
    ci[5] = 1000
    with pytest.raises(RuntimeError, match="col_idx entry 1000 at position 5"):
        A.sparse_conv2d(x, v, rp, ci, list(w.shape), None, *args)
    ci[5] = 0
    rp_view = rp[1:]
    rp_view[0] = 10_000  # through a view: same version counter
    with pytest.raises(RuntimeError, match="non-decreasing"):
        A.sparse_conv2d(x, v, rp, ci, list(w.shape), None, *args)


@needs_gpu
def test_cuda_malformed_csr_under_graph_capture_does_not_fault():
    # While a CUDA graph is captured no sync is allowed, so an unseen CSR is not validated: a corrupt
    # CSR must still stay inside its arrays (the result is unspecified, the context stays usable).
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, device="cuda")
    w = torch.randn(6, 4, 3, 3, device="cuda")
    v, rp, ci = ops.pack_csr(w)
    A = torch.ops.apb_sparse
    args = ([1, 1], [1, 1], [1, 1], 1)
    xl = torch.randn(3, 36, device="cuda")
    y = torch.randn(2, 6, 6, 6, device="cuda")
    yl = torch.randn(3, 6, device="cuda")
    # Warm up the allocator and the kernels on a side stream, as CUDA graphs require.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        A.sparse_conv2d(x, v, rp, ci, list(w.shape), None, *args)
    torch.cuda.current_stream().wait_stream(s)
    for r, c, _ in _malformed_csrs(rp, ci):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            A.sparse_conv2d(x, v, r, c, list(w.shape), None, *args)
            A.sparse_conv2d_backward_input(y, v, r, c, list(w.shape), list(x.shape), *args)
            A.sparse_linear(xl, v, r, c, 36, None)
            A.sparse_linear_backward_input(yl, v, r, c, 36)
        g.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(A.sparse_conv2d(x, v, rp, ci, list(w.shape), None, *args),
                               F.conv2d(x, w, None, 1, 1), rtol=1e-4, atol=1e-4)


@needs_gpu
def test_cuda_unsorted_and_duplicate_csr_entries_match_cpu():
    # The CSR-to-CSC sort of the backward ops keeps duplicates (summed, as on the CPU) and does not
    # assume sorted columns.
    torch.manual_seed(0)
    A = torch.ops.apb_sparse
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    v, rp, ci = ops.pack_csr(w * (torch.rand(w.shape) > 0.4))
    counts = (rp[1:] - rp[:-1]).tolist()
    perm = torch.cat([torch.randperm(n) + int(rp[i]) for i, n in enumerate(counts)])
    v, ci = v[perm].contiguous(), ci[perm].contiguous()  # columns shuffled within rows
    # Duplicate the first entry of row 1 (if any) by stealing the last entry of row 1.
    if counts[1] >= 2:
        ci[int(rp[2]) - 1] = ci[int(rp[1])]
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    args = ([2, 1], [1, 1], [1, 1], 1)
    ref = A.sparse_conv2d(x, v, rp, ci, list(w.shape), None, *args)
    got = A.sparse_conv2d(x.cuda(), v.cuda(), rp.cuda(), ci.cuda(), list(w.shape), None, *args)
    torch.testing.assert_close(got.cpu(), ref, **TOL[torch.float64])
    go = torch.randn_like(ref)
    ref_gi = A.sparse_conv2d_backward_input(go, v, rp, ci, list(w.shape), list(x.shape), *args)
    got_gi = A.sparse_conv2d_backward_input(go.cuda(), v.cuda(), rp.cuda(), ci.cuda(), list(w.shape),
                                            list(x.shape), *args)
    torch.testing.assert_close(got_gi.cpu(), ref_gi, **TOL[torch.float64])
    # The same CSR as a (5, 27) linear weight.
    gl = torch.randn(4, 5, dtype=torch.float64)
    ref_l = A.sparse_linear_backward_input(gl, v, rp, ci, 27)
    got_l = A.sparse_linear_backward_input(gl.cuda(), v.cuda(), rp.cuda(), ci.cuda(), 27)
    torch.testing.assert_close(got_l.cpu(), ref_l, **TOL[torch.float64])


@needs_gpu
@pytest.mark.parametrize("with_residual", [False, True])
def test_cuda_fused_residual_relu_matches_cpu_and_keeps_nan(with_residual):
    # The epilogue (bias + residual, then ReLU) runs on cuda; ReLU keeps NaN like torch.relu.
    torch.manual_seed(0)
    A = torch.ops.apb_sparse
    x = torch.randn(3, 8, 9, 9)
    w = torch.randn(16, 8, 3, 3) * (torch.rand(16, 8, 3, 3) > 0.8)
    b = torch.randn(16)
    v, rp, ci = ops.pack_csr(w)
    res = torch.randn(3, 16, 9, 9) if with_residual else None
    args = ([1, 1], [1, 1], [1, 1], 1)
    ref = torch.relu(F.conv2d(x, w, b, 1, 1) + (res if res is not None else 0))
    resc = res.cuda().to(memory_format=torch.channels_last) if res is not None else None  # any layout
    got = A.sparse_conv2d(x.cuda(), v.cuda(), rp.cuda(), ci.cuda(), list(w.shape), b.cuda(), *args, resc, True)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)
    assert bool((got >= 0).all())
    # NaN: put one in the input (it reaches the outputs of the taps that read it).
    xn = x.clone()
    xn[0, 0, 4, 4] = float("nan")
    ref_n = torch.relu(F.conv2d(xn, w, b, 1, 1) + (res if res is not None else 0))
    got_n = A.sparse_conv2d(xn.cuda(), v.cuda(), rp.cuda(), ci.cuda(), list(w.shape), b.cuda(), *args, resc, True)
    assert torch.isnan(got_n).any()
    # Ours is NaN only where the dense reference is (the dense conv also spreads NaN through zero
    # weights, 0 * nan = nan, so ours may be NaN in fewer places), and finite values agree.
    assert not bool(torch.isnan(got_n.cpu())[~torch.isnan(ref_n)].any())
    finite = ~torch.isnan(got_n.cpu())
    torch.testing.assert_close(got_n.cpu()[finite], ref_n[finite], rtol=1e-4, atol=1e-4)
    if res is not None:  # a NaN residual survives the ReLU
        rn = res.clone()
        rn[1, 2, 3, 4] = float("nan")
        got_r = A.sparse_conv2d(x.cuda(), v.cuda(), rp.cuda(), ci.cuda(), list(w.shape), b.cuda(), *args,
                                rn.cuda(), True)
        assert torch.isnan(got_r[1, 2, 3, 4])
        assert int(torch.isnan(got_r).sum()) == 1


@needs_gpu
def test_cuda_fused_resnet18_equals_masked_dense():
    # fuse=True moves residual adds and ReLUs into the sparse kernels' epilogue.
    torch.manual_seed(0)
    model = get_model("resnet18").eval()
    masked = apply_masks(model, magnitude_masks(model, 0.9))
    sparse = sparsify(masked, layout="unstructured", fuse=True).cuda()
    dense = copy.deepcopy(masked).cuda()
    x = torch.rand(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-4)


def _bf16_case(seed):
    rng = random.Random(seed)
    x, layout, weight, mask, bias, args = _conv_case(rng, torch.float32, n=2)
    # Round the data to bf16 once: the float32 reference then sees exactly the bf16 values.
    r = lambda t: t.bfloat16().float() if t is not None else None  # noqa: E731
    return r(x), layout, r(weight), mask, r(bias), args


@needs_gpu
@pytest.mark.parametrize("seed", range(3))
def test_cuda_bf16_ops_match_float32(seed):
    # bf16 storage, float accumulation: the only error is the final rounding (plus, for the
    # float32 reference, its own summation order), so a few bf16 ulps.
    A = torch.ops.apb_sparse
    torch.manual_seed(seed)
    for k in range(10):
        x, layout, weight, mask, bias, args = _bf16_case(100 * seed + k)
        xc, wc, mc = _to_cuda(x, layout), weight.cuda(), mask.cuda()
        bc = bias.cuda() if bias is not None else None
        bf = lambda t: t.bfloat16() if t is not None else None  # noqa: E731
        ref = F.conv2d(xc, wc * mc, bc, *args)
        scale = ref.abs().max().item() + 1e-3
        tol = dict(rtol=1e-2, atol=1e-2 * scale)
        got = A.masked_conv2d(bf(xc), bf(wc), bf(mc), bf(bc), *args)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref, **tol)
        v, rp, ci = ops.pack_csr(wc, mc)
        got = A.sparse_conv2d(bf(xc), bf(v), rp, ci, list(weight.shape), bf(bc), *args, None, True)
        torch.testing.assert_close(got.float(), torch.relu(ref), **tol)
        go = torch.randn_like(ref).bfloat16().float()
        ref_gi = torch.nn.grad.conv2d_input(x.shape, wc * mc, go, *args)
        gscale = ref_gi.abs().max().item() + 1e-3
        gtol = dict(rtol=1e-2, atol=1e-2 * gscale)
        got_gi = A.masked_conv2d_backward_input(bf(go), bf(wc), bf(mc), list(x.shape), *args)
        torch.testing.assert_close(got_gi.float(), ref_gi, **gtol)
        got_gs = A.sparse_conv2d_backward_input(bf(go), bf(v), rp, ci, list(weight.shape), list(x.shape), *args)
        torch.testing.assert_close(got_gs.float(), ref_gi, **gtol)
    wl = (torch.randn(40, 300, device="cuda") * (torch.rand(40, 300, device="cuda") > 0.9)).bfloat16()
    xl = torch.randn(9, 300, device="cuda").bfloat16()
    v, rp, ci = ops.pack_csr(wl)
    ref = xl.float() @ wl.float().t()
    got = A.sparse_linear(xl, v, rp, ci, 300, None)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    gl = torch.randn(9, 40, device="cuda").bfloat16()
    ref_gi = gl.float() @ wl.float()
    got_gi = A.sparse_linear_backward_input(gl, v, rp, ci, 300)
    torch.testing.assert_close(got_gi.float(), ref_gi, rtol=1e-2, atol=1e-2 * ref_gi.abs().max().item())


@needs_gpu
def test_cuda_bf16_autograd_through_wrappers():
    # The Python wrappers accept bf16 on cuda and the backward runs end to end in bf16.
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(16, 8, 3, 3, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    m = (torch.rand(16, 8, 3, 3, device="cuda") > 0.5).bfloat16()
    y = ops.masked_conv2d(x, w, m, None, 1, 1)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    F.conv2d(xr, wr * m.float(), None, 1, 1).square().sum().backward()
    torch.testing.assert_close(x.grad.float(), xr.grad, rtol=3e-2, atol=3e-2 * xr.grad.abs().max().item())
    torch.testing.assert_close(w.grad.float(), wr.grad * m.float(), rtol=3e-2,
                               atol=3e-2 * wr.grad.abs().max().item())
    v, rp, ci = ops.pack_csr(w.detach(), m)
    v.requires_grad_()
    xs = torch.randn(5, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = ops.sparse_linear(xs, v, rp, ci, 72)
    out.float().sum().backward()
    assert xs.grad.dtype == torch.bfloat16 and v.grad.dtype == torch.bfloat16


@needs_gpu
def test_cuda_backward_does_not_synchronise():
    # Autograd through sparse_conv2d / sparse_linear (values gradient included) must not read device
    # memory on the host once the CSR is validated: no repeat_interleave without output_size.
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9, device="cuda", requires_grad=True)
    w = torch.randn(16, 8, 3, 3, device="cuda")
    v, rp, ci = ops.pack_csr(w, (torch.rand_like(w) > 0.5).float())
    v.requires_grad_()
    xl = torch.randn(4, 72, device="cuda", requires_grad=True)

    def step():
        ops.sparse_conv2d(x, v, rp, ci, w.shape, None, 1, 1, relu=True).sum().backward()
        ops.sparse_linear(xl, v, rp, ci, 72).sum().backward()

    step()  # validates the CSR (one sync per op's column bound) and warms up
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_gpu
def test_cuda_sparse_model_graph_capture_and_side_stream():
    # A sparsified model is captured into a CUDA graph and replayed; the ops also run on a
    # non-default stream (every launch uses the current stream).
    torch.manual_seed(0)
    model = get_model("resnet18").eval()
    masked = apply_masks(model, magnitude_masks(model, 0.95))
    sparse = sparsify(masked, layout="unstructured").cuda()
    dense = copy.deepcopy(masked).cuda()
    x = torch.rand(8, 3, 32, 32, device="cuda")
    with torch.no_grad():
        ref = dense(x)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                side = sparse(x)
        torch.cuda.current_stream().wait_stream(s)
        torch.testing.assert_close(side, ref, rtol=1e-4, atol=1e-4)
        g = torch.cuda.CUDAGraph()
        static_x = x.clone()
        with torch.cuda.graph(g):
            static_y = sparse(static_x)
        static_x.copy_(torch.rand_like(x))
        g.replay()
        torch.testing.assert_close(static_y, dense(static_x), rtol=1e-4, atol=1e-4)


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_cuda_ops_on_second_device():
    # CUDAGuard: tensors on cuda:1 run on cuda:1 even when cuda:0 is current.
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, device="cuda:1")
    w = torch.randn(6, 4, 3, 3, device="cuda:1")
    m = (torch.rand_like(w) > 0.5).float()
    v, rp, ci = ops.pack_csr(w, m)
    with torch.cuda.device(0):
        got = ops.sparse_conv2d(x, v, rp, ci, w.shape, None, 1, 1)
        got_m = ops.masked_conv2d(x, w, m, None, 1, 1)
    assert got.device == x.device
    ref = F.conv2d(x, w * m, None, 1, 1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_m, ref, rtol=1e-4, atol=1e-4)


@needs_gpu
def test_cuda_linear_batch_beyond_grid_cap():
    # gridDim.y is capped at 65535 batch tiles of 8 rows: a batch of 530,000 > 524,280 rows takes
    # the grid-stride loop.
    torch.manual_seed(0)
    w = torch.randn(4, 8, device="cuda") * (torch.rand(4, 8, device="cuda") > 0.3)
    v, rp, ci = ops.pack_csr(w)
    x = torch.randn(530_000, 8, device="cuda")
    torch.testing.assert_close(ops.sparse_linear(x, v, rp, ci, 8), x @ w.t(), rtol=1e-4, atol=1e-4)
    g = torch.randn(530_000, 4, device="cuda")
    got = torch.ops.apb_sparse.sparse_linear_backward_input(g, v, rp, ci, 8)
    torch.testing.assert_close(got, g @ w, rtol=1e-4, atol=1e-4)


@needs_gpu
def test_cuda_weight_gradients_under_default_tf32():
    # The weight / mask gradients go through cuDNN, which by default computes float32 in TF32 on
    # Ampere and later: the autouse fixture turns it off; here it is on (the default users get),
    # and the gradients stay within TF32's ~1e-3 relative error of the exact ones.
    torch.manual_seed(0)
    x = torch.randn(8, 16, 16, 16, device="cuda")
    w = torch.randn(32, 16, 3, 3, device="cuda", requires_grad=True)
    m = (torch.rand(32, 16, 3, 3, device="cuda") > 0.5).float()
    exact = torch.nn.grad.conv2d_weight(x, w.shape, torch.ones(8, 32, 16, 16, device="cuda"), 1, 1) * m
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    ops.masked_conv2d(x, w, m, None, 1, 1).sum().backward()
    torch.testing.assert_close(w.grad, exact, rtol=1e-2, atol=1e-2 * exact.abs().max().item())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
def test_linear_value_gradient_in_chunks(device, monkeypatch):
    # The linear value gradient is a sampled product computed in chunks of nonzeros (bounded
    # temporaries): with tiny chunks it must still equal the dense gradient at the nonzeros.
    if not ops.available():
        pytest.skip("extension not built")
    torch.manual_seed(0)
    monkeypatch.setattr(ops, "_SAMPLED_CHUNK_ELEMENTS", 64)
    w = torch.randn(7, 30, dtype=torch.float64, device=device)
    w = w * (torch.rand(7, 30, device=device) > 0.5)
    v, rp, ci = ops.pack_csr(w)
    assert v.numel() > 64 // 5  # several chunks at batch 5
    v.requires_grad_()
    x = torch.randn(5, 30, dtype=torch.float64, device=device)
    g = torch.randn(5, 7, dtype=torch.float64, device=device)
    ops.sparse_linear(x, v, rp, ci, 30).backward(g)
    dense = g.t() @ x
    torch.testing.assert_close(v.grad, ops.pack_csr(dense, (w != 0).to(dense.dtype))[0])
    # No nonzeros at all: an empty gradient, not an error.
    v0, rp0, ci0 = ops.pack_csr(torch.zeros(7, 30, dtype=torch.float64, device=device))
    v0.requires_grad_()
    ops.sparse_linear(x, v0, rp0, ci0, 30).sum().backward()
    assert v0.grad.shape == (0,)


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
@pytest.mark.parametrize("layout", ["unstructured", "auto"])
def test_sparsified_resnet18_cuda_equals_masked_dense(layout):
    torch.manual_seed(0)
    model = get_model("resnet18").eval()
    for mod in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    masked = apply_masks(model, magnitude_masks(model, 0.9))
    sparse = sparsify(masked, layout=layout).cuda()
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


# ------------------------------------------------------------------------------------------------
# benchmarks/latency_cuda.py: the parts that need no GPU


def _latency_cuda():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "latency_cuda.py"
    spec = importlib.util.spec_from_file_location("latency_cuda", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_latency_cuda_arguments_ratios_and_json(tmp_path):
    lc = _latency_cuda()
    a = lc.parse_args([])
    assert a.archs == ["resnet18", "vgg16"] and a.batches == [1, 128] and a.rounds == 15
    assert a.variants == list(lc.VARIANTS) and a.out.endswith("latency_cuda.json")
    assert lc.parse_args(["--quick"]).archs == ["resnet18"]
    for bad in (["--masks", "ch@0.5"], ["--masks", "us@1.5"], ["--rounds", "0"], ["--variants", "ours_fp32"]):
        with pytest.raises(SystemExit):
            lc.parse_args(bad)
    r = lc.ratios({"dense_tf32": 2.0, "dense_bf16_cl": 1.0, "ours_fp32": 4.0, "ours_bf16": 0.5})
    assert r["vs_dense_tf32"] == {"dense_bf16_cl": 2.0, "ours_fp32": 0.5, "ours_bf16": 4.0}
    assert r["vs_dense_bf16_cl"] == {"dense_tf32": 0.5, "ours_fp32": 0.25, "ours_bf16": 2.0}
    assert lc.max_error(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.0])) == pytest.approx(0.5)
    built = {"report": apb_sparse.sparsity_report(torch.nn.Linear(4, 4)), "paths": {"dense": 1}}
    timing = {v: {"median_ms": t, "times_ms": [t, t], "reps": 3} for v, t in
              (("dense_tf32", 2.0), ("dense_bf16_cl", 1.0), ("ours_fp32", 4.0), ("ours_bf16", 0.5))}
    row = lc.make_row("resnet18", 1, "us@0.9", built, timing, {v: 0.0 for v in timing}, graphs=True)
    data = {"environment": {"gpu": "none"}, "variants": list(lc.VARIANTS), "results": [row]}
    out = lc.write_json(data, str(tmp_path / "sub" / "latency_cuda.json"))
    import json
    back = json.load(open(out))
    assert back["results"][0]["speedup"]["vs_dense_bf16_cl"]["ours_bf16"] == 2.0
    table = lc.markdown_table(data)
    assert "| resnet18 | 1 | us@0.9 |" in table and "0.50x" in table and "2.00x" in table


def test_latency_cuda_builds_the_variants_on_cpu():
    if not ops.available():
        pytest.skip("extension not built")
    lc = _latency_cuda()
    built = lc.build_variants("resnet18", "us@0.9", "cpu")
    assert set(lc.VARIANTS) <= set(built)
    assert next(built["dense_bf16_cl"]["model"].parameters()).dtype == torch.bfloat16
    assert built["dense_bf16_cl"]["memory_format"] == torch.channels_last
    assert all(v.dtype == torch.bfloat16 for v in built["ours_bf16"]["model"].buffers() if v.is_floating_point())
    assert any(isinstance(m, apb_sparse.nn.SparseConv2d) for m in built["ours_fp32"]["model"].modules())
    assert not any(isinstance(m, apb_sparse.nn.SparseConv2d) for m in built["dense_tf32"]["model"].modules())
    assert built["report"].sparsity == pytest.approx(0.9, abs=0.02)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = built["exact"]["model"](x)
        assert lc.max_error(built["ours_fp32"]["model"](x), ref) < lc.TOLERANCE["ours_fp32"]
        assert lc.max_error(built["dense_tf32"]["model"](x), ref) == 0.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_latency_cuda_without_a_gpu_exits_with_a_clear_message(capsys, tmp_path):
    lc = _latency_cuda()
    assert lc.main(["--quick", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err
    assert not (tmp_path / "x.json").exists()
