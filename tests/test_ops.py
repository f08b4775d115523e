"""Kernels against the pure-PyTorch references: fuzzed shapes, gradients, opcheck, bad inputs."""
import random

import pytest
import torch
import torch.nn.functional as F

from apb_sparse import ops, reference

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _conv_case(rng: random.Random, device, dtype, sparsity=None):
    groups = rng.choice([1, 1, 1, 2, 3])
    depthwise = rng.random() < 0.15
    cg = rng.randint(1, 5)
    c = cg * groups
    og = rng.randint(1, 4)
    o = og * groups
    if depthwise:
        groups, c, o = c, c, c
    kh, kw = rng.choice([(1, 1), (3, 3), (3, 3), (5, 5), (2, 3), (1, 3)])
    stride = (rng.randint(1, 3), rng.randint(1, 3))
    dilation = (rng.randint(1, 2), rng.randint(1, 2))
    padding = (rng.randint(0, 2), rng.randint(0, 2))
    h = rng.randint(dilation[0] * (kh - 1) + 1, 12)
    w = rng.randint(dilation[1] * (kw - 1) + 1, 12)
    n = rng.choice([1, 2, 3])
    x = torch.randn(n, c, h, w, dtype=dtype, device=device)
    if rng.random() < 0.25:
        x = x.to(memory_format=torch.channels_last)
    elif rng.random() < 0.2:
        x = torch.randn(n, c, h, 2 * w, dtype=dtype, device=device)[..., ::2]  # non-contiguous
    weight = torch.randn(o, c // groups, kh, kw, dtype=dtype, device=device)
    s = rng.choice([0.0, 0.3, 0.6, 0.9, 0.99, 1.0]) if sparsity is None else sparsity
    mask = (torch.rand(weight.shape, device=device) >= s).to(dtype)
    if rng.random() < 0.3 and o > 1:
        mask[rng.randrange(o)] = 0  # an empty output channel
    bias = torch.randn(o, dtype=dtype, device=device) if rng.random() < 0.7 else None
    return x, weight, mask, bias, stride, padding, dilation, groups


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(3))
def test_conv_ops_match_reference(device, dtype, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for _ in range(25):
        x, weight, mask, bias, stride, padding, dilation, groups = _conv_case(rng, device, dtype)
        args = (stride, padding, dilation, groups)
        ref = reference.masked_conv2d(x, weight, mask, bias, *args)
        got = ops.masked_conv2d(x, weight, mask, bias, *args)
        torch.testing.assert_close(got, ref, **TOL[dtype])
        v, rp, ci = ops.pack_csr(weight, mask)
        got_sparse = ops.sparse_conv2d(x, v, rp, ci, weight.shape, bias, *args)
        torch.testing.assert_close(got_sparse, ref, **TOL[dtype])
        torch.testing.assert_close(reference.sparse_conv2d(x, v, rp, ci, weight.shape, bias, *args), ref,
                                   **TOL[dtype])

        # input gradients (the path white-box attacks use) and weight / mask gradients
        gout = torch.randn_like(ref)
        xr = x.detach().clone().requires_grad_()
        wr = weight.detach().clone().requires_grad_()
        mr = mask.detach().clone().requires_grad_()
        F.conv2d(xr, wr * mr, bias, *args).backward(gout)
        xk = x.detach().clone().requires_grad_()
        wk = weight.detach().clone().requires_grad_()
        mk = mask.detach().clone().requires_grad_()
        ops.masked_conv2d(xk, wk, mk, bias, *args).backward(gout)
        torch.testing.assert_close(xk.grad, xr.grad, **TOL[dtype])
        torch.testing.assert_close(wk.grad, wr.grad, **TOL[dtype])
        torch.testing.assert_close(mk.grad, mr.grad, **TOL[dtype])
        xs = x.detach().clone().requires_grad_()
        ops.sparse_conv2d(xs, v, rp, ci, weight.shape, bias, *args).backward(gout)
        torch.testing.assert_close(xs.grad, xr.grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_op_matches_reference(device, dtype):
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(20):
        i, o = rng.randint(1, 40), rng.randint(1, 30)
        lead = rng.choice([(), (0,), (1,), (5,), (3, 4), (33,)])
        x = torch.randn(*lead, i, dtype=dtype, device=device)
        weight = torch.randn(o, i, dtype=dtype, device=device)
        weight *= torch.rand(o, i, device=device) >= rng.choice([0.0, 0.5, 0.95, 1.0])
        bias = torch.randn(o, dtype=dtype, device=device) if rng.random() < 0.5 else None
        v, rp, ci = ops.pack_csr(weight)
        ref = F.linear(x, weight, bias)
        torch.testing.assert_close(ops.sparse_linear(x, v, rp, ci, i, bias), ref, **TOL[dtype])
        torch.testing.assert_close(reference.sparse_linear(x, v, rp, ci, i, bias), ref, **TOL[dtype])
        if x.numel():
            gout = torch.randn_like(ref)
            xr = x.clone().requires_grad_()
            F.linear(xr, weight, bias).backward(gout)
            xs = x.clone().requires_grad_()
            ops.sparse_linear(xs, v, rp, ci, i, bias).backward(gout)
            torch.testing.assert_close(xs.grad, xr.grad, **TOL[dtype])


def test_batch_zero_and_extreme_sparsity(device):
    for n in (0, 2):
        x = torch.randn(n, 4, 7, 7, device=device)
        w = torch.randn(6, 4, 3, 3, device=device)
        for mask in (torch.zeros_like(w), torch.ones_like(w)):
            b = torch.randn(6, device=device)
            ref = F.conv2d(x, w * mask, b, 1, 1)
            got = ops.masked_conv2d(x, w, mask, b, 1, 1)
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref)
            v, rp, ci = ops.pack_csr(w, mask)
            torch.testing.assert_close(ops.sparse_conv2d(x, v, rp, ci, w.shape, b, 1, 1), ref)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_thread_count(threads):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(1)
        x = torch.randn(4, 32, 16, 16)
        w = torch.randn(64, 32, 3, 3)
        mask = (torch.rand_like(w) > 0.9).float()
        mask[:5] = 1.0  # uneven rows: exercise nonzero-balanced splitting
        torch.testing.assert_close(ops.masked_conv2d(x, w, mask, None, 1, 1), F.conv2d(x, w * mask, None, 1, 1),
                                   rtol=1e-5, atol=1e-4)
        xs = torch.randn(1, 8, 5, 5)
        ws = torch.randn(2, 8, 3, 3)  # fewer rows than threads: position splitting
        torch.testing.assert_close(ops.masked_conv2d(xs, ws, torch.ones_like(ws), None, 1, 1),
                                   F.conv2d(xs, ws, None, 1, 1), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.skipif(not ops.available(), reason="extension not built")
def test_portable_and_vectorised_kernels_agree():
    torch.manual_seed(2)
    x = torch.randn(3, 16, 13, 11, dtype=torch.float64)
    w = torch.randn(24, 16, 3, 3, dtype=torch.float64)
    mask = (torch.rand_like(w) > 0.8).double()
    fast = ops.masked_conv2d(x, w, mask, None, 2, 1)
    prev = ops.use_portable_kernel(True)
    try:
        portable = ops.masked_conv2d(x, w, mask, None, 2, 1)
    finally:
        ops.use_portable_kernel(prev)
    torch.testing.assert_close(portable, fast, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(portable, F.conv2d(x, w * mask, None, 2, 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,c,hw,o,stride,groups", [
    (1, 8, 32, 16, 1, 1),    # 32-wide rows: 2 (float) / 1 (double) output rows per tile
    (3, 16, 16, 8, 1, 2),    # grouped, several images in a chunk
    (7, 64, 16, 8, 1, 1),    # batch split into per-thread chunks of 3 images (partial last chunk)
    (40, 4, 8, 8, 1, 1),     # 8-wide rows: 8 output rows per float tile
    (2, 8, 16, 12, 2, 1),    # stride 2: 8x8 output from the phase-split grid
    (2, 6, 8, 6, 1, 1),      # 4-wide float64 rows; float32 falls back to the strip layout
    (1, 8, 4, 16, 1, 1),     # 4-wide float rows: tap-major layout, one image
    (5, 8, 8, 16, 2, 1),     # tap-major from stride 2, images crossing tile boundaries
    (3, 4, 2, 6, 1, 1),      # 2x2 outputs: tap-major in both dtypes
    (3, 8, 7, 8, 2, 4),      # tap-major, grouped, odd input size
    (7, 512, 4, 4, 1, 1),    # tap-major in per-thread chunks of 3 images (partial last chunk)
])
def test_row_tiles_match_strip_layout(dtype, n, c, hw, o, stride, groups):
    """The specialised layouts (output-row tiles: whole output rows per register tile, stored from
    registers; tap-major strips for outputs narrower than a vector) and the strip layout over the
    padded grid give the same results, including the
    fused residual + ReLU epilogue, and both match torch."""
    torch.manual_seed(3)
    x = torch.randn(n, c, hw, hw, dtype=dtype)
    w = torch.randn(o, c // groups, 3, 3, dtype=dtype) * (torch.rand(o, c // groups, 3, 3) > 0.7).to(dtype)
    b = torch.randn(o, dtype=dtype)
    v, rp, ci = ops.pack_csr(w)
    ref = F.conv2d(x, w, b, stride, 1, 1, groups)
    res = torch.randn_like(ref)
    outs = []
    for enable in (True, False):
        prev = ops.use_row_tiles(enable)
        try:
            plain = ops.sparse_conv2d(x, v, rp, ci, w.shape, b, stride, 1, 1, groups)
            fused = ops.sparse_conv2d(x, v, rp, ci, w.shape, b, stride, 1, 1, groups, residual=res, relu=True)
        finally:
            ops.use_row_tiles(prev)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(plain, ref, **tol)
        torch.testing.assert_close(fused, torch.relu(ref + res), **tol)
        outs.append((plain, fused))
    # Both layouts sum the same products in different orders (over up to 1,400 terms here).
    torch.testing.assert_close(outs[0][0], outs[1][0], **tol)
    torch.testing.assert_close(outs[0][1], outs[1][1], **tol)


def test_opcheck(device):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    m = (torch.rand(w.shape, device=device) > 0.5).double().requires_grad_()
    b = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    v, rp, ci = ops.pack_csr(w.detach(), m.detach())
    v.requires_grad_()
    xl = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    vl, rl, cl = ops.pack_csr(torch.randn(4, 5, dtype=torch.float64, device=device) *
                              (torch.rand(4, 5, device=device) > 0.5))
    bl = torch.randn(4, dtype=torch.float64, device=device)
    go = torch.randn(2, 6, 4, 8, dtype=torch.float64, device=device)
    cases = [
        (torch.ops.apb_sparse.masked_conv2d, (x, w, m, b, [2, 1], [1, 2], [1, 1], 2)),
        (torch.ops.apb_sparse.sparse_conv2d, (x, v, rp, ci, list(w.shape), b, [2, 1], [1, 2], [1, 1], 2)),
        (torch.ops.apb_sparse.sparse_linear, (xl, vl, rl, cl, 5, bl)),
        # the 2x2 max pool in the store: inference only (no tensor requires grad)
        (torch.ops.apb_sparse.sparse_conv2d, (x.detach(), v.detach(), rp, ci, list(w.shape), b.detach(), [1, 1],
                                              [1, 1], [1, 1], 2, None, True, True)),
        (torch.ops.apb_sparse.sparse_conv2d_pair, (x.detach(), v.detach(), rp, ci, list(w.shape), b.detach(), [1, 1],
                                                   [1, 1], [1, 1], 2, True, v.detach()[:0], rp[:1].clone(),
                                                   ci[:0], [0, 3, 1, 1], None, [2, 1], [0, 0], [1, 1], 2)),
        (torch.ops.apb_sparse.masked_conv2d_backward_input,
         (go, w.detach(), m.detach(), list(x.shape), [2, 1], [1, 2], [1, 1], 2)),
        (torch.ops.apb_sparse.sparse_conv2d_backward_input,
         (go, v.detach(), rp, ci, list(w.shape), list(x.shape), [2, 1], [1, 2], [1, 1], 2)),
        (torch.ops.apb_sparse.sparse_linear_backward_input, (torch.randn(3, 4, dtype=torch.float64, device=device),
                                                             vl, rl, cl, 5)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_gradcheck(device):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(6, 2, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    m = (torch.rand(w.shape, device=device) > 0.4).double().requires_grad_()
    b = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.masked_conv2d(*a, (2, 1), 1, (1, 2), 2), (x, w, m, b))
    v, rp, ci = ops.pack_csr(w.detach(), m.detach())
    v.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, v, b: ops.sparse_conv2d(x, v, rp, ci, w.shape, b, 1, (0, 2), 1, 2),
                                    (x, v, b))
    xl = torch.randn(3, 7, dtype=torch.float64, device=device, requires_grad=True)
    vl, rl, cl = ops.pack_csr(torch.randn(4, 7, dtype=torch.float64, device=device) *
                              (torch.rand(4, 7, device=device) > 0.5))
    vl.requires_grad_()
    bl = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: ops.sparse_linear(x, v, rl, cl, 7, b), (xl, vl, bl))


def test_gradcheck_detects_wrong_gradients():
    # Guard that the checks above can fail: a deliberately wrong backward must be caught.
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    wrong = torch.randn_like(w)
    v, rp, ci = ops.pack_csr(w)
    gout = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    gi = torch.ops.apb_sparse.sparse_conv2d_backward_input(gout, ops.pack_csr(wrong)[0], rp, ci, list(w.shape),
                                                           list(x.shape), [1, 1], [1, 1], [1, 1], 1)
    x.grad = None
    F.conv2d(x, w, None, 1, 1).backward(gout)
    assert not torch.allclose(gi, x.grad)


class TestBadInputs:
    def setup_method(self):
        self.x = torch.randn(2, 4, 8, 8)
        self.w = torch.randn(6, 4, 3, 3)
        self.m = torch.ones_like(self.w)

    def test_mask_shape_mismatch(self):
        with pytest.raises(RuntimeError, match="mask"):
            ops.masked_conv2d(self.x, self.w, torch.ones(6, 4, 3, 2))

    def test_mask_dtype(self):
        with pytest.raises(RuntimeError, match="mask dtype"):
            ops.masked_conv2d(self.x, self.w, self.m.double())

    def test_input_dtype(self):
        with pytest.raises(TypeError, match="weight dtype torch.float32 does not match the input dtype"):
            ops.masked_conv2d(self.x.half(), self.w, self.m)
        with pytest.raises(TypeError, match="input"):
            ops.masked_conv2d(self.x.long(), self.w, self.m)
        # float16 / bfloat16 are computed in float32 and cast back
        for dtype in (torch.float16, torch.bfloat16):
            got = ops.masked_conv2d(self.x.to(dtype), self.w.to(dtype), self.m.to(dtype))
            assert got.dtype == dtype
            want = F.conv2d(self.x.to(dtype).float(), self.w.to(dtype).float()).to(dtype)
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)

    def test_non_4d_input(self):
        with pytest.raises(ValueError, match="input must be 4-D"):
            ops.masked_conv2d(self.x[0], self.w, self.m)
        v, rp, ci = ops.pack_csr(self.w)
        with pytest.raises(ValueError, match="input must be 4-D"):
            ops.sparse_conv2d(self.x[0], v, rp, ci, self.w.shape)

    def test_negative_padding(self):
        with pytest.raises(ValueError, match="padding"):
            ops.masked_conv2d(self.x, self.w, self.m, None, 1, -1)
        with pytest.raises(RuntimeError, match="padding"):
            torch.ops.apb_sparse.masked_conv2d(self.x, self.w, self.m, None, [1, 1], [-1, 0], [1, 1], 1)

    def test_bad_stride_and_groups(self):
        with pytest.raises(ValueError, match="stride"):
            ops.masked_conv2d(self.x, self.w, self.m, None, 0)
        with pytest.raises(ValueError, match="groups"):
            ops.masked_conv2d(self.x, self.w, self.m, None, 1, 0, 1, 0)
        with pytest.raises(RuntimeError, match="channels"):
            ops.masked_conv2d(self.x, self.w, self.m, None, 1, 0, 1, 2)

    def test_wrong_device(self):
        with pytest.raises(ValueError, match="mask is on meta"):
            ops.masked_conv2d(self.x, self.w, self.m.to("meta"))

    def test_input_too_small(self):
        with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
            ops.masked_conv2d(torch.randn(1, 4, 2, 2), self.w, self.m)

    def test_corrupt_csr(self):
        v, rp, ci = ops.pack_csr(self.w)
        bad = ci.clone()
        bad[0] = 10_000
        with pytest.raises(RuntimeError, match="col_idx"):
            ops.sparse_conv2d(self.x, v, rp, bad, self.w.shape)
        with pytest.raises(RuntimeError, match="row_ptr"):
            ops.sparse_conv2d(self.x, v, rp[:-1], ci, self.w.shape)
        with pytest.raises(RuntimeError, match="row_ptr must be a 1-D int32"):
            ops.sparse_conv2d(self.x, v, rp.long(), ci, self.w.shape)
        with pytest.raises(RuntimeError, match="values dtype"):
            ops.sparse_conv2d(self.x, v.double(), rp, ci, self.w.shape)

    def test_linear_feature_mismatch(self):
        v, rp, ci = ops.pack_csr(torch.randn(3, 5))
        with pytest.raises(RuntimeError, match="in_features"):
            ops.sparse_linear(torch.randn(2, 4), v, rp, ci, 5)
        with pytest.raises(RuntimeError, match="bias"):
            ops.sparse_linear(torch.randn(2, 5), v, rp, ci, 5, torch.randn(4))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,c,size,k", [(5, 64, 16, 1), (7, 128, 8, 1), (3, 256, 4, 3)])
def test_partial_chunk_without_padding_rows(threads, n, c, size, k):
    # No padding rows between images: a chunk's rounded tail reaches the next image's first row,
    # which must not be written (it lies past the output for the last, partial chunk).
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(4)
        x = torch.randn(n, c, size, size)
        w = torch.randn(16, c, k, k) * (torch.rand(16, c, k, k) > 0.5)
        v, rp, ci = ops.pack_csr(w)
        torch.testing.assert_close(ops.sparse_conv2d(x, v, rp, ci, w.shape), F.conv2d(x, w), rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("stride", [1, 2])
def test_batch_chunks_with_partial_last_chunk(threads, stride):
    # 64 channels of 20x20 images: ~2 images per L2-sized chunk, 9 images -> a partial last chunk.
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(3)
        x = torch.randn(9, 64, 20, 20).to(memory_format=torch.channels_last)
        w = torch.randn(16, 64, 3, 3)
        mask = (torch.rand_like(w) > 0.9).float()
        b = torch.randn(16)
        r = torch.randn(9, 16, 20 // stride, 20 // stride)
        ref = torch.relu(F.conv2d(x, w * mask, b, stride, 1) + r)
        v, rp, ci = ops.pack_csr(w, mask)
        got = ops.sparse_conv2d(x, v, rp, ci, w.shape, b, stride, 1, residual=r, relu=True)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(prev)


# ---------------------------------------------------------------------------------------------
# Issue 12: sizes that overflowed, zero-size operands, NaN through the fused ReLU, double backward.

@pytest.mark.parametrize("stride", [(7, 1), (100, 3), (2**32, 2**32), (2**62, 1)])
def test_stride_beyond_the_input_matches_reference(stride):
    # stride_h * stride_w overflowed to 0 for 2**32 (a zero-length table was written).
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 2, dtype=torch.float64)
    m = (torch.rand_like(w) > 0.5).double()
    want = F.conv2d(x, w * m, None, stride, 1)
    g = torch.randn_like(want)
    (gwant,) = torch.autograd.grad(want, x, g)
    v, rp, ci = ops.pack_csr(w, m)
    for got in (ops.masked_conv2d(x, w, m, None, stride, 1), ops.sparse_conv2d(x, v, rp, ci, w.shape, None, stride, 1)):
        torch.testing.assert_close(got, want)
        (gx,) = torch.autograd.grad(got, x, g)
        torch.testing.assert_close(gx, gwant)


def test_no_input_channels_and_no_output_channels():
    x = torch.randn(2, 0, 5, 5)
    w = torch.randn(3, 0, 3, 3)
    b = torch.tensor([1.0, -2.0, 3.0])
    v, rp, ci = ops.pack_csr(w)
    want = b.view(1, 3, 1, 1).expand(2, 3, 3, 3)
    torch.testing.assert_close(ops.sparse_conv2d(x, v, rp, ci, w.shape, b), want)
    torch.testing.assert_close(ops.masked_conv2d(x, w, torch.ones_like(w), b), want)
    r = torch.randn(2, 3, 3, 3)
    torch.testing.assert_close(ops.sparse_conv2d(x, v, rp, ci, w.shape, b, residual=r, relu=True),
                               torch.relu(want + r))
    # No output channels: empty output, zero input gradient.
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    w = torch.randn(0, 4, 3, 3)
    v, rp, ci = ops.pack_csr(w)
    out = ops.sparse_conv2d(x, v, rp, ci, w.shape)
    assert out.shape == (2, 0, 3, 3)
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros_like(x))
    gi = torch.ops.apb_sparse.masked_conv2d_backward_input(torch.randn(2, 0, 3, 3), w, w, [2, 4, 5, 5], [1, 1],
                                                           [0, 0], [1, 1], 1)
    torch.testing.assert_close(gi, torch.zeros(2, 4, 5, 5))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_fused_relu_propagates_non_finite_like_torch(value):
    # The fused epilogue computed y > 0 ? y : 0, which maps NaN to 0 (torch.relu keeps NaN).
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    v, rp, ci = ops.pack_csr(w)
    for portable in (False, True):
        previous = ops.use_portable_kernel(portable)
        try:
            for hw in (8, 5, 2):  # output-row tiles, strips, tap-major layout
                x = torch.randn(2, 4, hw, hw)
                x[0, 0, hw // 2, hw // 2] = value
                want = torch.relu(F.conv2d(x, w, None, 1, 1))
                got = ops.sparse_conv2d(x, v, rp, ci, w.shape, None, 1, 1, relu=True)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
                assert torch.isnan(got).any() == torch.isnan(want).any()
        finally:
            ops.use_portable_kernel(previous)


def test_gradgradcheck():
    # create_graph=True used to run the sparse backward ops, which have no derivatives of their
    # own (torch only warned): second derivatives were silently wrong.
    torch.manual_seed(0)
    d = dict(dtype=torch.float64)
    x = torch.randn(2, 2, 4, 4, **d, requires_grad=True)
    w = torch.randn(2, 2, 2, 3, **d, requires_grad=True)
    m = (torch.rand(2, 2, 2, 3) > 0.5).double().requires_grad_(True)
    b = torch.randn(2, **d, requires_grad=True)
    check = dict(fast_mode=True)  # full Jacobians cost minutes on a loaded 2-core machine
    assert torch.autograd.gradgradcheck(lambda x, w, m, b: ops.masked_conv2d(x, w, m, b, 2, 1), (x, w, m, b),
                                        **check)
    v, rp, ci = ops.pack_csr(w.detach(), m.detach())
    v.requires_grad_(True)
    r = torch.randn(2, 2, 3, 2, **d, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda x, v, b, r: ops.sparse_conv2d(x, v, rp, ci, w.shape, b, 2, 1, residual=r), (x, v, b, r), **check)
    lw = torch.randn(4, 5, **d) * (torch.rand(4, 5) > 0.4)
    lv, lrp, lci = ops.pack_csr(lw)
    lv.requires_grad_(True)
    xl = torch.randn(3, 5, **d, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, v: ops.sparse_linear(x, v, lrp, lci, 5, None), (xl, lv), **check)


def test_gradgradcheck_detects_wrong_second_derivatives():
    # The check above can fail: a first-order-only backward (the previous behaviour) is caught.
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    v, rp, ci = ops.pack_csr(w)

    class FirstOrderOnly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            ctx.save_for_backward(t)
            return ops.sparse_conv2d(t, v, rp, ci, w.shape) ** 2

        @staticmethod
        def backward(ctx, g):
            (t,) = ctx.saved_tensors
            with torch.no_grad():  # detached: its own derivative is lost
                y = ops.sparse_conv2d(t, v, rp, ci, w.shape)
                return torch.ops.apb_sparse.sparse_conv2d_backward_input(2 * y * g, v, rp, ci, list(w.shape),
                                                                         list(t.shape), [1, 1], [0, 0], [1, 1], 1)

    assert torch.autograd.gradcheck(FirstOrderOnly.apply, (x,))  # first order is right
    with pytest.raises(Exception):
        torch.autograd.gradgradcheck(FirstOrderOnly.apply, (x,), fast_mode=True)
