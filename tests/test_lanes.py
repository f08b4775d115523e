"""The images-in-lanes layout of the CPU forward convolution (small maps, batch >= 8).

Every ISA the CPU supports, lanes on and off, against torch: partial last chunks (batches that
are not a multiple of the lane count), 1/2/4 units per position, stride, dilation, groups,
padding 0, odd kernels, non-contiguous inputs, the fused residual + ReLU, and NaN propagation.
"""
import pytest
import torch
import torch.nn.functional as F

from apb_sparse import ops

pytest.importorskip("apb_sparse._C")
ISAS = ops.supported_isas()
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def lanes(isa, enable):
    return ops.kernel_config(isa=isa, lanes=enable)


def _weight(o, cg, kh, kw, sparsity, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(o, cg, kh, kw, generator=g, dtype=dtype)
    return w * (torch.rand(o, cg, kh, kw, generator=g) >= sparsity).to(dtype)


# (batch, in channels, H, W, out channels, kernel (kh, kw), stride, padding, dilation, groups, sparsity)
CASES = [
    (8, 16, 8, 8, 32, (3, 3), 2, 1, 1, 1, 0.9),     # 8x8 -> 4x4, one unit per position
    (16, 32, 4, 4, 64, (3, 3), 1, 1, 1, 1, 0.95),   # two units
    (40, 32, 4, 4, 24, (3, 3), 2, 1, 1, 1, 0.8),    # 4 units, partial last chunk, 2x2 output
    (33, 8, 5, 7, 12, (1, 3), 1, (0, 1), 1, 1, 0.5),  # odd map, 1x3 kernel, unequal padding
    (64, 12, 6, 6, 18, (3, 3), 1, 2, 2, 3, 0.6),    # dilation 2, groups 3
    (9, 4, 8, 8, 6, (5, 5), 1, 0, 1, 1, 0.3),       # 5x5 kernel, no padding, 4x4 output
    (20, 16, 2, 2, 16, (1, 1), 1, 0, 1, 1, 0.99),   # 1x1, nearly empty rows
    (32, 1, 8, 8, 16, (3, 3), 1, 1, 1, 1, 0.6),     # one input channel, 64 output pixels
    (40, 288, 4, 4, 8, (3, 3), 1, 1, 1, 1, 0.9),    # wide input: fewer images per chunk (L2-sized), partial chunk
    (32, 64, 2, 2, 48, (3, 3), 1, 1, 1, 1, 0.9),    # 2x2 maps: 2 units so that 2 threads each take a chunk
    (32, 64, 4, 4, 40, (3, 3), 1, 1, 1, 1, 0.6),    # long rows on 4x4 (AVX2: 2 units, 6-pixel blocks + 4)
    (24, 32, 6, 6, 16, (3, 3), 2, 1, 1, 1, 0.5),    # strided into 3x3 (9 pixels: a 6-pixel block, then 3 single)
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"s{c[6]}d{c[8]}g{c[9]}")
def test_lanes_matches_torch(isa, dtype, case):
    n, c, h, w_, o, k, stride, pad, dil, groups, sparsity = case
    torch.manual_seed(1)
    x = torch.randn(n, c, h, w_, dtype=dtype)
    w = _weight(o, c // groups, k[0], k[1], sparsity, dtype)
    b = torch.randn(o, dtype=dtype)
    ref = F.conv2d(x, w, b, stride, pad, dil, groups)
    res = torch.randn_like(ref)
    v, rp, ci = ops.pack_csr(w)
    for enable in (True, False):
        with lanes(isa, enable):
            plain = ops.sparse_conv2d(x, v, rp, ci, w.shape, b, stride, pad, dil, groups)
            fused = ops.sparse_conv2d(x, v, rp, ci, w.shape, b, stride, pad, dil, groups, residual=res, relu=True)
            relu = ops.sparse_conv2d(x, v, rp, ci, w.shape, None, stride, pad, dil, groups, relu=True)
        torch.testing.assert_close(plain, ref, **TOL[dtype])
        torch.testing.assert_close(fused, torch.relu(ref + res), **TOL[dtype])
        torch.testing.assert_close(relu, torch.relu(ref - b.view(1, -1, 1, 1)), **TOL[dtype])


@pytest.mark.parametrize("threads", [1, 2])
def test_lanes_threads_and_layouts(threads):
    """Chunks split across threads (many chunks) and rows split across threads (one chunk), on a
    channels-last and a sliced (non-contiguous) input."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(2)
        w = _weight(48, 32, 3, 3, 0.9, torch.float32)
        v, rp, ci = ops.pack_csr(w)
        for n in (12, 32, 200):
            x = torch.randn(n, 32, 4, 4).to(memory_format=torch.channels_last)
            xs = torch.randn(n, 64, 4, 8)[:, ::2, :, 1::2]
            for inp in (x, xs):
                got = ops.sparse_conv2d(inp, v, rp, ci, w.shape, None, 1, 1)
                torch.testing.assert_close(got, F.conv2d(inp, w, None, 1, 1), rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(prev)


def test_lanes_propagates_nan_and_keeps_other_images_clean():
    """A NaN in one image reaches only that image's outputs (no lane mixing), as in torch."""
    torch.manual_seed(3)
    x = torch.randn(24, 8, 4, 4)
    x[5, 3, 1, 2] = float("nan")
    w = _weight(16, 8, 3, 3, 0.0, torch.float32)
    v, rp, ci = ops.pack_csr(w)
    got = ops.sparse_conv2d(x, v, rp, ci, w.shape, None, 1, 1, relu=True)
    ref = torch.relu(F.conv2d(x, w, None, 1, 1))
    assert torch.isnan(got[5]).any()
    torch.testing.assert_close(got, ref, equal_nan=True)
    assert not torch.isnan(got[torch.arange(24) != 5]).any()


def test_min_parallel_work_switch_keeps_results():
    """Calls below the work threshold run on one thread: same results either way (2 threads), and
    the threshold refuses negative values."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(4)
        w = _weight(32, 16, 3, 3, 0.8, torch.float32)
        v, rp, ci = ops.pack_csr(w)
        lw = torch.randn(24, 40) * (torch.rand(24, 40) > 0.7)
        lv, lrp, lci = ops.pack_csr(lw)
        outs = []
        for threshold in (0, 1 << 40):
            with ops.kernel_config(min_parallel_work=threshold):
                for n, hw in ((1, 16), (12, 4), (3, 9)):
                    x = torch.randn(n, 16, hw, hw, generator=torch.Generator().manual_seed(n))
                    outs.append(ops.sparse_conv2d(x, v, rp, ci, w.shape, None, 1, 1))
                outs.append(ops.sparse_linear(torch.randn(5, 40, generator=torch.Generator().manual_seed(9)),
                                              lv, lrp, lci, 40))
        half = len(outs) // 2
        for a, b in zip(outs[:half], outs[half:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[0], F.conv2d(torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1)),
                                                     w, None, 1, 1), rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="work' must be >= 0"):
            with ops.kernel_config(min_parallel_work=-1):
                pass
    finally:
        torch.set_num_threads(prev_threads)


# Maps whose rows split into 4-pixel segments (output width a multiple of 4, >= 8) at one vector of
# images per position (float batches 8-15, halved for float64): the lanes kernel runs 4x3 pixel tiles
# over the first rows (a multiple of 3) and 8-pixel blocks over the rest.
TILE_CASES = [
    (8, 16, 8, 8, 24, (3, 3), 1, 1, 1, 1, 0.7),      # 8x8: 6 tiled rows, 2 rows of 8-pixel blocks
    (13, 8, 12, 12, 16, (3, 3), 1, 1, 1, 1, 0.3),    # 12x12: every row tiled, partial last chunk
    (8, 96, 8, 16, 32, (3, 3), 1, 1, 1, 1, 0.9),     # 8x16: input-channel chunks, 2 untiled rows
    (12, 12, 8, 8, 18, (3, 3), 1, 2, 2, 3, 0.6),     # dilation 2, groups 3
    (9, 4, 10, 10, 6, (3, 3), 1, 0, 1, 1, 0.3),      # no padding: 8x8 output
    (10, 8, 7, 20, 8, (3, 5), 1, (1, 2), 1, 1, 0.5),  # 3x5 kernel, 7x20: 6 tiled rows + 1 row of 20
    # Strided: each channel plane split into its stride phases, output rows tiled as well
    (8, 16, 16, 16, 24, (3, 3), 2, 1, 1, 1, 0.7),    # 16x16 -> 8x8, stride 2
    (11, 8, 17, 15, 8, (3, 3), 2, 0, 1, 1, 0.5),     # odd input, no padding: 8x7 output (7 wide: no tiles)
    (9, 6, 13, 24, 12, (3, 3), (1, 3), (2, 1), 2, 1, 0.2),  # stride (1, 3), dilation 2, padding (2, 1)
    (12, 12, 16, 16, 12, (5, 5), 2, 2, 1, 3, 0.6),   # 5x5 stride 2, groups 3
    (8, 16, 16, 16, 32, (1, 1), 2, 0, 1, 1, 0.8),    # 1x1 stride 2 (a ResNet shortcut): one phase read
    (8, 8, 17, 16, 16, (3, 3), 2, 2, 2, 1, 0.5),     # 3x3 stride 2 dilation 2: one phase of four read
    (9, 8, 16, 18, 8, (1, 1), (2, 3), 0, 1, 1, 0.3),  # 1x1 stride (2, 3): one phase of six read
]


def _check_lanes_configs(isa, dtype, case, configs, seed):
    """Plain and fused (residual + ReLU) sparse conv against torch under each
    (kernel options, threads) of ``configs``, the lanes layout on."""
    n, c, h, w_, o, k, stride, pad, dil, groups, sparsity = case
    torch.manual_seed(seed)
    x = torch.randn(n, c, h, w_, dtype=dtype)
    w = _weight(o, c // groups, k[0], k[1], sparsity, dtype, seed=seed + 1)
    b = torch.randn(o, dtype=dtype)
    ref = F.conv2d(x, w, b, stride, pad, dil, groups)
    res = torch.randn_like(ref)
    v, rp, ci = ops.pack_csr(w)
    prev_threads = torch.get_num_threads()
    try:
        for options, threads in configs:
            torch.set_num_threads(threads or prev_threads)
            with ops.kernel_config(isa=isa, lanes=True, **options):
                plain = ops.sparse_conv2d(x, v, rp, ci, w.shape, b, stride, pad, dil, groups)
                fused = ops.sparse_conv2d(x, v, rp, ci, w.shape, b, stride, pad, dil, groups, residual=res,
                                          relu=True)
            torch.testing.assert_close(plain, ref, **TOL[dtype])
            torch.testing.assert_close(fused, torch.relu(ref + res), **TOL[dtype])
    finally:
        torch.set_num_threads(prev_threads)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", TILE_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"s{c[6]}d{c[8]}g{c[9]}")
def test_lanes_tiles_match_torch(isa, dtype, case):
    n = case[0] if dtype == torch.float32 else max(4, case[0] // 2)
    # One thread too: strided convs on larger maps take the lanes layout at 4 multiply-adds per input
    # value only where every thread has a whole chunk of images (the dilated stride-2 case).
    _check_lanes_configs(isa, dtype, (n, *case[1:]), [(dict(lanes_tiles=True), None), (dict(lanes_tiles=False), None),
                                                      (dict(lanes_tiles=True), 1)], seed=5)


# Input-channel chunks with several 8-pixel blocks per output channel (wide inputs on small maps):
# the blocks of a row run back to back per chunk of its nonzeros (lanes_blocks_inner, the default)
# or block by block; both must match torch.
BLOCK_ORDER_CASES = [
    (8, 256, 4, 4, 32, (3, 3), 1, 1, 1, 1, 0.9),     # 4x4: 2 blocks per row, direct NCHW stores
    (16, 128, 4, 4, 24, (3, 3), 1, 1, 1, 1, 0.9),    # two units of lanes per pixel
    (11, 192, 5, 5, 16, (3, 3), 1, 1, 1, 1, 0.8),    # 5x5: 3 blocks + 1 pixel, partial last chunk
    (8, 128, 8, 8, 40, (3, 3), 2, 1, 1, 1, 0.9),     # stride 2 into 4x4
    (9, 192, 8, 8, 16, (3, 3), 1, 1, 1, 1, 0.9),     # 8x8: tiled rows, then 2 rows of blocks
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", BLOCK_ORDER_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"s{c[6]}")
def test_lanes_block_orders_match_torch(isa, dtype, case):
    blocking = dict(channel_blocking=True)
    _check_lanes_configs(isa, dtype, case, [(dict(blocking, lanes_blocks_inner=True), None),
                                            (dict(blocking, lanes_blocks_inner=False), None),
                                            (dict(blocking, lanes_blocks_inner=True), 1)], seed=7)


# Narrow maps with long rows: two vectors of images per pixel on AVX2, blocks of 6 pixels, then
# one of 4, then single pixels; with input-channel blocking and without.  The tails of rows with
# one vector per pixel (blocks of 8) too.
WIDE_BLOCK_CASES = [
    (32, 96, 4, 4, 24, (3, 3), 1, 1, 1, 1, 0.5),    # 16 pixels: 6 + 6 + 4
    (40, 64, 5, 5, 16, (3, 3), 1, 1, 1, 1, 0.6),    # 25 pixels: 6 x 4 + 1, partial last chunk
    (32, 48, 6, 6, 8, (3, 3), 2, 1, 1, 1, 0.4),     # stride 2 into 3x3: 6 + 3 single
    (8, 64, 2, 2, 32, (3, 3), 1, 1, 1, 1, 0.5),     # one vector per pixel, 2x2: one block of 4
    (12, 32, 6, 6, 16, (3, 3), 1, 1, 1, 1, 0.5),    # one vector per pixel, 36 pixels: 8 x 4 + 4
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", WIDE_BLOCK_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"s{c[6]}")
def test_lanes_wide_blocks_match_torch(isa, dtype, case):
    _check_lanes_configs(isa, dtype, case, [(dict(channel_blocking=True), None), (dict(channel_blocking=False), None),
                                            (dict(channel_blocking=True), 1), (dict(channel_blocking=False), 1)],
                         seed=9)


def _settings(isa):
    """(threads, lanes on) for 2 and 1 threads, lanes on and off, each in force while the caller's
    loop body runs (the thread count restored after)."""
    prev = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            for enable in (True, False):
                with lanes(isa, enable):
                    yield threads, enable
    finally:
        torch.set_num_threads(prev)


def _assert_identical(got, want, where):
    assert got.shape == want.shape, where
    assert torch.equal(got.isnan(), want.isnan()), where
    assert torch.equal(got.nan_to_num(0.25), want.nan_to_num(0.25)), where


# (batch, in channels, H, W, out channels, kernel, stride, padding, sparsity): maps the 2x2 max
# pool meets after a conv, odd ones included (floor mode drops the last row / column).
POOL_CASES = [
    (32, 16, 32, 32, 16, 3, 1, 1, 0.9),   # tiles, 16x16 pooled
    (16, 24, 8, 8, 40, 3, 1, 1, 0.8),     # 8-pixel blocks
    (32, 64, 4, 4, 32, 3, 1, 1, 0.95),    # 4x4 maps (direct stores when unpooled)
    (32, 64, 2, 2, 48, 3, 1, 1, 0.9),     # 2x2 -> 1x1, two units
    (20, 12, 11, 13, 20, 3, 1, 1, 0.6),   # odd map, partial last chunk
    (9, 8, 10, 10, 12, 3, 2, 1, 0.5),     # stride 2 into 5x5 (odd pooled input)
    (24, 8, 1, 1, 8, 1, 1, 0, 0.5),       # 1x1 map: pools to an empty one
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"s{c[6]}")
def test_max_pool_in_the_store_matches_conv_then_pool(isa, dtype, case):
    """max_pool=True (pooled in the lanes layout's store pass, or the pool op after another layout)
    gives exactly F.max_pool2d of the unpooled op's output: plain, with the ReLU, with a residual
    (pooled after the epilogue), NaN propagated, on 2 threads and 1."""
    n, c, h, w_, o, k, stride, pad, sparsity = case
    torch.manual_seed(3)
    x = torch.randn(n, c, h, w_, dtype=dtype)
    x[1, 0, h // 2, w_ // 2] = float("nan")
    w = _weight(o, c, k, k, sparsity, dtype)
    b = torch.randn(o, dtype=dtype)
    v, rp, ci = ops.pack_csr(w)
    for threads, enable in _settings(isa):
        for relu in (False, True):
            full = ops.sparse_conv2d(x, v, rp, ci, w.shape, b, stride, pad, relu=relu)
            res = torch.randn_like(full)
            got = ops.sparse_conv2d(x, v, rp, ci, w.shape, b, stride, pad, relu=relu, max_pool=True)
            got_res = ops.sparse_conv2d(x, v, rp, ci, w.shape, b, stride, pad, residual=res, relu=relu, max_pool=True)
            with_res = ops.sparse_conv2d(x, v, rp, ci, w.shape, b, stride, pad, residual=res, relu=relu)
            for pooled, unpooled in ((got, full), (got_res, with_res)):
                want = F.max_pool2d(unpooled, 2, 2) if min(unpooled.shape[-2:]) >= 2 else \
                    unpooled[..., : unpooled.shape[-2] // 2, : unpooled.shape[-1] // 2]
                _assert_identical(pooled, want, (threads, enable, relu))
    if h // stride >= 4:  # NaN reached some pooled output (its taps read it)
        assert got.isnan().any()


# (batch, in channels, mid channels, out channels, H, W, conv1 (k, stride, pad), conv2 (k, stride, pad),
#  sparsity): two convs in a row, as deploy pairs them
PAIR_CASES = [
    (32, 16, 16, 16, 32, 32, (3, 1, 1), (3, 1, 1), 0.9),   # tiles on 32x32, whole chunks per thread
    (20, 8, 16, 12, 8, 8, (3, 2, 1), (3, 1, 1), 0.7),     # strided conv1, partial last chunk
    (32, 3, 16, 16, 16, 16, (3, 1, 1), (3, 1, 1), 0.0),   # a dense 3-channel stem: fewer images per chunk
    (32, 32, 48, 32, 4, 4, (3, 1, 1), (3, 1, 1), 0.9),    # 4x4 maps
    (32, 32, 32, 24, 2, 2, (3, 1, 1), (1, 1, 0), 0.8),    # 2x2 maps, a 1x1 conv2
    (24, 8, 12, 8, 7, 5, (3, 1, 1), (3, 1, 1), 0.5),      # odd map (the pool drops a row and a column)
    (16, 8, 8, 8, 8, 8, (3, 1, 1), (3, 2, 1), 0.5),       # strided conv2: two calls
    (8, 8, 8, 8, 8, 8, (3, 1, 1), (3, 1, 1), 0.5),        # one chunk for two threads: two calls
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", PAIR_CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_conv_pair_matches_two_calls(isa, dtype, case):
    """sparse_conv2d_pair (the intermediate activation kept in the lanes layout, chunk by chunk)
    gives exactly sparse_conv2d twice: with and without the first ReLU, the residual, the second
    ReLU and the max pool, NaN propagated, on 2 threads and 1, lanes on and off."""
    n, c, cm, co, h, w_, (k1, s1, p1), (k2, s2, p2), sparsity = case
    torch.manual_seed(4)
    x = torch.randn(n, c, h, w_, dtype=dtype)
    x[1, 0, h // 2, w_ // 2] = float("nan")
    w1, w2 = _weight(cm, c, k1, k1, sparsity, dtype, 1), _weight(co, cm, k2, k2, sparsity, dtype, 2)
    b1, b2 = torch.randn(cm, dtype=dtype), torch.randn(co, dtype=dtype)
    v1, r1, c1 = ops.pack_csr(w1)
    v2, r2, c2 = ops.pack_csr(w2)
    pair = torch.ops.apb_sparse.sparse_conv2d_pair
    prev = torch.get_num_threads()
    for threads, enable in _settings(isa):
        for relu1, relu, pool, with_res in ((True, True, False, True), (False, False, False, False),
                                            (True, True, True, False), (True, False, True, True)):
            mid = ops.sparse_conv2d(x, v1, r1, c1, w1.shape, b1, s1, p1, relu=relu1)
            full = ops.sparse_conv2d(mid, v2, r2, c2, w2.shape, b2, s2, p2)
            res = torch.randn_like(full) if with_res else None
            want = ops.sparse_conv2d(mid, v2, r2, c2, w2.shape, b2, s2, p2, residual=res, relu=relu, max_pool=pool)
            got = pair(x, v1, r1, c1, list(w1.shape), b1, [s1] * 2, [p1] * 2, [1, 1], 1, relu1, v2, r2, c2,
                       list(w2.shape), b2, [s2] * 2, [p2] * 2, [1, 1], 1, res, relu, pool)
            _assert_identical(got, want, (threads, enable, relu1, relu, pool, with_res))
    assert want.isnan().any()  # the NaN reached the output through both convs
    if k1 == 3 and p1 == 1 and s2 == 1:  # ResNet's downsampling shortcut: 1x1 with conv1's stride, as the residual
        ws = _weight(co, c, 1, 1, sparsity, dtype, 3)
        vs, rs, cs = ops.pack_csr(ws)
        bs = torch.randn(co, dtype=dtype)
        for threads in (2, 1):
            torch.set_num_threads(threads)
            try:
                with lanes(isa, True):
                    sc = ops.sparse_conv2d(x, vs, rs, cs, ws.shape, bs, s1, 0)
                    mid = ops.sparse_conv2d(x, v1, r1, c1, w1.shape, b1, s1, p1, relu=True)
                    want = ops.sparse_conv2d(mid, v2, r2, c2, w2.shape, b2, s2, p2, residual=sc, relu=True)
                    got = pair(x, v1, r1, c1, list(w1.shape), b1, [s1] * 2, [p1] * 2, [1, 1], 1, True, v2, r2, c2,
                               list(w2.shape), b2, [s2] * 2, [p2] * 2, [1, 1], 1, None, True, False, vs, rs, cs, bs)
            finally:
                torch.set_num_threads(prev)
            # the shortcut alone may take another layout than in the pair: equal up to rounding
            assert torch.equal(got.isnan(), want.isnan())
            torch.testing.assert_close(got.nan_to_num(0.25), want.nan_to_num(0.25), **TOL[dtype])
        with pytest.raises(RuntimeError, match="exclude each other"):
            pair(x, v1, r1, c1, list(w1.shape), b1, [s1] * 2, [p1] * 2, [1, 1], 1, True, v2, r2, c2, list(w2.shape), b2,
                 [s2] * 2, [p2] * 2, [1, 1], 1, sc, True, False, vs, rs, cs, bs)
    x.requires_grad_()
    with pytest.raises(RuntimeError, match="sparse_conv2d_pair has no backward"):
        pair(x, v1, r1, c1, list(w1.shape), b1, [s1] * 2, [p1] * 2, [1, 1], 1, True, v2, r2, c2, list(w2.shape), b2,
             [s2] * 2, [p2] * 2, [1, 1], 1)
    with pytest.raises(RuntimeError, match="residual has shape"):
        pair(x.detach(), v1, r1, c1, list(w1.shape), b1, [s1] * 2, [p1] * 2, [1, 1], 1, True, v2, r2, c2,
             list(w2.shape), b2, [s2] * 2, [p2] * 2, [1, 1], 1, torch.zeros(1, dtype=dtype))
