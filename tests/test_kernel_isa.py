"""CPU kernel builds (portable / AVX2+FMA / AVX-512) and input-channel (L1) blocking.

Every build the CPU supports is forced in turn and must agree with torch, with and without the
channel-blocked loops and the specialised layouts.  The AVX-512 build only runs where the CPU has
AVX-512; the portable build shares its two-vector accumulator layout, so that code shape is tested
on every machine.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from apb_sparse import ops

pytest.importorskip("apb_sparse._C")
ISAS = ops.supported_isas()
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def kernel_config(isa, blocking=True, row_tiles=True):
    return ops.kernel_config(isa=isa, channel_blocking=blocking, row_tiles=row_tiles)


@contextlib.contextmanager
def _threads(n):
    """n threads, and every call split across them however small (min_parallel_work=0)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with ops.kernel_config(min_parallel_work=0):
            yield
    finally:
        torch.set_num_threads(prev)


def _isa():
    return ops.kernel_options()["isa"]


def test_isa_query_and_force():
    assert ISAS[0] == "generic" and ISAS == sorted(ISAS, key=["generic", "avx2", "avx512"].index)
    best = _isa()
    assert best == ISAS[-1]
    for isa in ISAS:
        with ops.kernel_config(isa=isa) as prev:
            assert _isa() == isa and prev == {"isa": best}
    assert _isa() == best
    # The public switch maps onto the cap.
    prev = ops.use_portable_kernel(True)
    try:
        assert _isa() == "generic" and ops.use_portable_kernel(True) is True
    finally:
        ops.use_portable_kernel(prev)
    assert _isa() == best


def test_kernel_options_list_and_restore():
    before = ops.kernel_options()
    assert set(before) == {"isa", "row_tiles", "channel_blocking", "lanes", "lanes_tiles", "lanes_blocks_inner",
                           "shifted_layout", "min_parallel_work", "output_cache_bytes"}
    flipped = dict(row_tiles=not before["row_tiles"], channel_blocking=not before["channel_blocking"],
                   lanes=not before["lanes"], lanes_tiles=not before["lanes_tiles"],
                   lanes_blocks_inner=not before["lanes_blocks_inner"], shifted_layout=(before["shifted_layout"] + 1) % 3,
                   min_parallel_work=before["min_parallel_work"] + 7, isa=ISAS[0],
                   output_cache_bytes=before["output_cache_bytes"] + 64)
    with ops.kernel_config(**flipped):
        assert ops.kernel_options() == flipped
    assert ops.kernel_options() == before
    # Restored on an exception raised inside the block, too.
    with pytest.raises(KeyError):
        with ops.kernel_config(lanes=not before["lanes"]):
            raise KeyError("inside")
    assert ops.kernel_options() == before


def test_kernel_config_rejects_bad_options():
    before = ops.kernel_options()
    for kwargs, err, match in [(dict(isa="sse9"), ValueError, "isa' must be"),
                               (dict(isa=2), TypeError, "isa' must be a str"),
                               (dict(lanes=1), TypeError, "'lanes' takes True or False"),
                               (dict(lanes_tiles=0), TypeError, "'lanes_tiles' takes True or False"),
                               (dict(shifted_layout=3), ValueError, "shifted_layout"),
                               (dict(shifted_layout=True), TypeError, "shifted_layout' takes an int"),
                               (dict(min_parallel_work=-1), ValueError, "min_parallel_work' must be >= 0"),
                               (dict(output_cache_bytes=-1), ValueError, "output_cache_bytes' must be >= 0"),
                               (dict(tiles=True), ValueError, "unknown kernel option 'tiles'")]:
        with pytest.raises(err, match=match):
            with ops.kernel_config(row_tiles=not before["row_tiles"], **kwargs):
                pass
        assert ops.kernel_options() == before, kwargs
    if "avx512" not in ISAS:
        with pytest.raises(ValueError, match="not supported"):
            with ops.kernel_config(isa="avx512"):
                pass
    assert ops.kernel_options() == before


def _sparse_weight(o, cg, k, sparsity, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, cg, k, k, generator=g, dtype=dtype)
    return w * (torch.rand(o, cg, k, k, generator=g) >= sparsity).to(dtype)


# (batch, channels, size, out channels, stride, groups, sparsity): ResNet-18 CIFAR geometries, whose
# rows are split into tap chunks by the channel blocking, plus strip-layout widths (9, 12),
# stride 2, groups and tap-major (4x4) cases.
CASES = [
    (1, 64, 32, 64, 1, 1, 0.9),     # output-row tiles, 2 rows per tile, chunked
    (1, 128, 16, 128, 1, 1, 0.8),   # 4 rows per tile, chunked
    (1, 256, 8, 96, 1, 1, 0.9),     # 8 rows of one vector, chunked
    (2, 64, 16, 64, 2, 1, 0.7),     # stride 2 (phase grid), strip layout (8x8 out, 9-wide grid)
    (1, 96, 9, 32, 1, 1, 0.5),      # strip layout with a partial last tile, chunked
    (1, 64, 12, 48, 1, 2, 0.6),     # groups, strip layout
    (2, 128, 4, 64, 1, 1, 0.9),     # tap-major layout (4x4 outputs)
    (1, 32, 8, 16, 1, 1, 0.99),     # nearly empty rows
    # images-in-lanes layout (batch >= one vector of images), split into tap chunks when blocked:
    (8, 64, 16, 32, 1, 1, 0.9),     # large map (over 64 pixels), 8-pixel blocks within a row
    (9, 256, 4, 48, 1, 1, 0.9),     # small map, blocks across output rows, partial image chunk
    (8, 512, 2, 24, 1, 1, 0.9),     # 2x2 map: fewer pixels than a block (single-pixel path)
    (17, 128, 8, 40, 2, 1, 0.85),   # stride 2, 16 images in two units plus a partial chunk
]


def _check_plain_and_fused(x, w, b, stride, padding, groups, configs):
    """ops.sparse_conv2d, plain and fused with residual + ReLU, under each kernel configuration
    (context-manager factories), against F.conv2d."""
    ref = F.conv2d(x, w, b, stride, padding, 1, groups)
    res = torch.randn_like(ref)
    v, rp, ci = ops.pack_csr(w)
    for config in configs:
        with config():
            plain = ops.sparse_conv2d(x, v, rp, ci, w.shape, b, stride, padding, 1, groups)
            fused = ops.sparse_conv2d(x, v, rp, ci, w.shape, b, stride, padding, 1, groups, residual=res, relu=True)
        torch.testing.assert_close(plain, ref, **TOL[x.dtype])
        torch.testing.assert_close(fused, torch.relu(ref + res), **TOL[x.dtype])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv_forward_every_isa_and_blocking(isa, dtype, case):
    n, c, hw, o, stride, groups, sparsity = case
    torch.manual_seed(1)
    x = torch.randn(n, c, hw, hw, dtype=dtype)
    w = _sparse_weight(o, c // groups, 3, sparsity, dtype)
    b = torch.randn(o, dtype=dtype)
    configs = [lambda bl=bl, rt=rt: kernel_config(isa, bl, rt) for bl in (True, False) for rt in (True, False)]
    _check_plain_and_fused(x, w, b, stride, 1, groups, configs)


# Strided 1x1 convs (ResNet shortcuts), lanes layout on and off: the grid fills only the stride
# phase they read; the lanes layout transposes the whole input and reads every other pixel.
# (batch, channels, height, width, out channels, stride, groups, sparsity)
STRIDED_1X1 = [
    (16, 128, 16, 16, 256, (2, 2), 1, 0.9),   # 8x8 out (lanes when on)
    (9, 64, 15, 17, 128, (2, 3), 2, 0.8),     # odd sizes, unequal strides, groups, partial image chunk
    (8, 96, 20, 20, 64, (2, 2), 1, 0.9),      # 10x10 out, under 16 nonzeros per output channel: grid
    (3, 64, 8, 8, 128, (2, 2), 1, 0.9),       # batch under a vector: grid
]


@contextlib.contextmanager
def _isa_and_lanes(isa, lanes):
    with kernel_config(isa, True, True), ops.kernel_config(lanes=lanes):
        yield


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", STRIDED_1X1, ids=lambda c: "x".join(map(str, c)))
def test_strided_1x1_conv_every_isa(isa, dtype, case):
    n, c, h, w_, o, stride, groups, sparsity = case
    torch.manual_seed(2)
    x = torch.randn(n, c, h, w_, dtype=dtype)
    w = _sparse_weight(o, c // groups, 1, sparsity, dtype)
    b = torch.randn(o, dtype=dtype)
    _check_plain_and_fused(x, w, b, stride, 0, groups, [lambda la=la: _isa_and_lanes(isa, la) for la in (True, False)])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("batch", [1, 8])
def test_blocking_with_unsorted_columns(isa, batch):
    """The tap chunks are found by binary search (grid layouts) or a linear scan (lanes layout, batch
    8) over each row's columns; a CSR whose columns are not sorted must still use every nonzero
    exactly once."""
    torch.manual_seed(2)
    x = torch.randn(batch, 128, 16, 16)
    w = _sparse_weight(64, 128, 3, 0.8, torch.float32)
    v, rp, ci = ops.pack_csr(w)
    g = torch.Generator().manual_seed(5)
    v2, ci2 = v.clone(), ci.clone()
    for r in range(64):
        s, e = int(rp[r]), int(rp[r + 1])
        perm = torch.randperm(e - s, generator=g) + s
        v2[s:e], ci2[s:e] = v[perm], ci[perm]
    ref = F.conv2d(x, w, None, 1, 1)
    with kernel_config(isa, blocking=True):
        got = ops.sparse_conv2d(x, v2, rp, ci2, w.shape, None, 1, 1)
    torch.testing.assert_close(got, ref, **TOL[torch.float32])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_and_backward_every_isa(isa, dtype):
    torch.manual_seed(3)
    w = torch.randn(37, 53, dtype=dtype) * (torch.rand(37, 53) > 0.6).to(dtype)
    v, rp, ci = ops.pack_csr(w)
    b = torch.randn(37, dtype=dtype)
    x = torch.randn(21, 53, dtype=dtype)
    xc = torch.randn(3, 24, 10, 10, dtype=dtype, requires_grad=True)
    wc = _sparse_weight(16, 24, 3, 0.7, dtype)
    vc, rpc, cic = ops.pack_csr(wc)
    with kernel_config(isa):
        y = ops.sparse_linear(x, v, rp, ci, 53, b)
        yc = ops.sparse_conv2d(xc, vc, rpc, cic, wc.shape, None, 2, 1)
        (gx,) = torch.autograd.grad(yc.sum(), xc)
    torch.testing.assert_close(y, F.linear(x, w, b), **TOL[dtype])
    xr = xc.detach().requires_grad_()
    (gr,) = torch.autograd.grad(F.conv2d(xr, wc, None, 2, 1).sum(), xr)
    torch.testing.assert_close(gx, gr, **TOL[dtype])


def test_isas_agree_with_each_other():
    """All builds compute the same sums (up to summation order) on a ResNet-18 layer."""
    torch.manual_seed(4)
    x = torch.randn(1, 256, 8, 8, dtype=torch.float64)
    w = _sparse_weight(256, 256, 3, 0.95, torch.float64)
    v, rp, ci = ops.pack_csr(w)
    outs = []
    for isa in ISAS:
        with kernel_config(isa):
            outs.append(ops.sparse_conv2d(x, v, rp, ci, w.shape, None, 1, 1))
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2])
def test_stride2_grid_fill_every_width_and_padding(threads):
    """The stride-2 phase grid is filled two column phases per pass (one contiguous read per input
    row); odd and even widths, paddings 0-3, stride (1, 2) and (2, 2), dilation, 1x1 and 3x3 / 5x5
    kernels, channels-last inputs (strided fallback), and fills split across threads."""
    with _threads(threads):
        torch.manual_seed(6)
        for n, c, h, w_, k, stride, pad, dil in [(1, 5, 9, 11, 3, 2, 1, 1), (3, 4, 8, 8, 3, (2, 2), 0, 1),
                                                  (2, 6, 7, 10, 5, (1, 2), 2, 1), (1, 3, 12, 13, 3, 2, 3, 2),
                                                  (2, 8, 16, 16, 1, 2, 0, 1), (1, 9, 6, 5, 3, 2, (1, 2), 1)]:
            x = torch.randn(n, c, h, w_)
            wt = _sparse_weight(7, c, k, 0.5, torch.float32)
            v, rp, ci = ops.pack_csr(wt)
            ref = F.conv2d(x, wt, None, stride, pad, dil)
            for inp in (x, x.to(memory_format=torch.channels_last)):
                got = ops.sparse_conv2d(inp, v, rp, ci, wt.shape, None, stride, pad, dil)
                torch.testing.assert_close(got, ref, **TOL[torch.float32])


def shifted_layout(mode):
    # lanes off: batches of 8 or more would otherwise take the images-in-lanes layout instead
    return ops.kernel_config(shifted_layout=mode, lanes=False)


def test_shifted_layout_switch():
    with ops.kernel_config(shifted_layout=2):
        with ops.kernel_config(shifted_layout=0) as prev:
            assert prev == {"shifted_layout": 2} and ops.kernel_options()["shifted_layout"] == 0
        for bad in (-1, 3):
            with pytest.raises(ValueError, match="0 \\(off\\), 1 \\(auto\\) or 2"):
                with ops.kernel_config(shifted_layout=bad):
                    pass
        assert ops.kernel_options()["shifted_layout"] == 2


# (batch, channels, height, width, out channels, kernel (kh, kw), padding, dilation, groups, sparsity):
# unit-stride convolutions whose output rows fill register tiles (widths 8, 16, 32 in float; 4 and 8
# in double also go through the grid), which the kw-shifted layout can take.
SHIFTED_CASES = [
    (2, 16, 32, 32, 24, (3, 3), (1, 1), (1, 1), 1, 0.8),   # 32-wide rows, channel-blocked
    (9, 24, 16, 16, 16, (3, 3), (1, 1), (1, 1), 1, 0.5),   # 16-wide rows, odd batch
    (1, 8, 8, 8, 8, (3, 3), (1, 1), (1, 1), 1, 0.0),       # 8-wide rows, dense
    (2, 12, 12, 18, 8, (5, 3), (0, 1), (1, 2), 1, 0.7),    # 8x16 output, dilation in width, no row padding
    (1, 6, 10, 10, 4, (3, 3), (0, 0), (1, 1), 2, 0.3),     # no padding (8x8 output), groups
    (2, 8, 16, 16, 8, (1, 3), (0, 1), (1, 1), 1, 0.6),     # 1x3 kernel
    (2, 8, 16, 16, 8, (1, 1), (0, 0), (1, 1), 1, 0.6),     # 1x1 kernel (mode 2 only)
    (1, 32, 16, 16, 32, (3, 3), (1, 1), (1, 1), 1, 0.99),  # nearly empty rows
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", SHIFTED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_shifted_layout_every_isa(isa, dtype, case):
    """The kw-shifted input layout (off, auto, forced) agrees with torch on every ISA, with and
    without channel blocking, for contiguous, channels-last and sliced inputs, plain and fused."""
    n, c, h, w_, o, k, pad, dil, groups, sparsity = case
    torch.manual_seed(6)
    x = torch.randn(n, c, h, w_, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(o, c // groups, *k, generator=g, dtype=dtype)
    w = w * (torch.rand(w.shape, generator=g) >= sparsity).to(dtype)
    b = torch.randn(o, dtype=dtype)
    ref = F.conv2d(x, w, b, 1, pad, dil, groups)
    res = torch.randn_like(ref)
    v, rp, ci = ops.pack_csr(w)
    wide = torch.randn(n, c, h, w_ + 3, dtype=dtype)
    wide[..., 1:w_ + 1] = x
    inputs = [x, x.to(memory_format=torch.channels_last), wide[..., 1:w_ + 1]]
    for mode in (0, 1, 2):
        for blocking in (True, False):
            with kernel_config(isa, blocking), shifted_layout(mode):
                for xi in inputs:
                    plain = ops.sparse_conv2d(xi, v, rp, ci, w.shape, b, 1, pad, dil, groups)
                    torch.testing.assert_close(plain, ref, **TOL[dtype])
                fused = ops.sparse_conv2d(x, v, rp, ci, w.shape, b, 1, pad, dil, groups, residual=res, relu=True)
                torch.testing.assert_close(fused, torch.relu(ref + res), **TOL[dtype])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("sparsity", [0.5, 0.99])
def test_shifted_layout_threads(threads, sparsity):
    """Every way the call is split across threads (whole chunks per thread, a private copy per
    thread, one shared copy whose fill is split at any (channel, kw) unit) gives the same result."""
    with _threads(threads):
        torch.manual_seed(8)
        for n, c in ((1, 5), (1, 40), (3, 7), (16, 16)):
            x = torch.randn(n, c, 16, 16)
            w = _sparse_weight(24, c, 3, sparsity, torch.float32)
            b = torch.randn(24)
            v, rp, ci = ops.pack_csr(w)
            ref = F.conv2d(x, w, b, 1, 1)
            for mode in (1, 2):
                with shifted_layout(mode):
                    got = ops.sparse_conv2d(x, v, rp, ci, w.shape, b, 1, 1)
                torch.testing.assert_close(got, ref, **TOL[torch.float32])


def test_output_cache_reuses_freed_outputs_and_keeps_results():
    """Forward outputs come from a cache of freed blocks (no page faults on reuse): a freed output's
    block is handed out again for the next output of that size, every result stays exact, outputs
    alive at the same time never share memory, and a cap of 0 turns the cache off."""
    torch.manual_seed(9)
    x = torch.randn(4, 16, 16, 16)
    w = _sparse_weight(24, 16, 3, 0.8, torch.float32)
    v, rp, ci = ops.pack_csr(w)
    ref = F.conv2d(x, w, None, 1, 1)
    lw = torch.randn(12, 40) * (torch.rand(12, 40) > 0.5)
    lv, lrp, lci = ops.pack_csr(lw)
    xl = torch.randn(7, 40)
    with ops.kernel_config(output_cache_bytes=1 << 26):
        a = ops.sparse_conv2d(x, v, rp, ci, w.shape, None, 1, 1)
        b = ops.sparse_conv2d(x, v, rp, ci, w.shape, None, 1, 1)
        assert a.data_ptr() != b.data_ptr()  # both alive: distinct blocks
        torch.testing.assert_close(a, ref, **TOL[torch.float32])
        torch.testing.assert_close(b, ref, **TOL[torch.float32])
        ptr = a.data_ptr()
        del a
        c = ops.sparse_conv2d(x * 2, v, rp, ci, w.shape, None, 1, 1)
        assert c.data_ptr() == ptr  # the freed block, reused
        torch.testing.assert_close(c, 2 * ref, **TOL[torch.float32])
        c.add_(1)  # outputs are ordinary writable tensors
        torch.testing.assert_close(b, ref, **TOL[torch.float32])
        torch.testing.assert_close(ops.sparse_linear(xl, lv, lrp, lci, 40), xl @ lw.t(), **TOL[torch.float32])
        del b, c
        with ops.kernel_config(output_cache_bytes=0):  # lowering the cap frees what is cached
            d = ops.sparse_conv2d(x, v, rp, ci, w.shape, None, 1, 1)
            e = ops.sparse_conv2d(x, v, rp, ci, w.shape, None, 1, 1)
            torch.testing.assert_close(d, ref, **TOL[torch.float32])
            torch.testing.assert_close(e, ref, **TOL[torch.float32])
