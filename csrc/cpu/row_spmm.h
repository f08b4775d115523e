// Row-gather sparse kernel shared by every CPU op of apb_sparse.
//
// All sparse convolutions (forward and backward-to-input) and sparse linear layers are rewritten
// as one primitive: for every sparse row r and every position p of a contiguous strip,
//
//     acc = init[r] + sum_{j in row r} val[j] * src[src_base[r] + tap[col[j]] + p]
//     dst[dst_base[r] + run.dst + (p - run.start) * run.step] = act(acc + residual[same offset])
//
// where tap[] is a small per-call table (one entry per distinct tap, e.g. per (input channel,
// kh, kw) of a convolution: the offset of that tap's input strip, already shifted) and the runs
// describe where the positions of each register tile are stored.  Inner loop: broadcast one
// weight and FMA it into a register tile of NV vectors of consecutive positions, so the cost is
// one vector load + one FMA per nonzero and vector: no im2col, no index arithmetic per position,
// and no per-call work proportional to the number of nonzeros (the table has one entry per tap).
//
// This header includes no torch headers on purpose: it is compiled three times (AVX-512, AVX2+FMA
// and the baseline ISA), and the objects must not share inline torch code.
#pragma once

#include <cstdint>

namespace apb_sparse {
namespace kernel {

/// Positions [t, t + len) of a tile are stored at dst_base[r] + dst + k * step, k = 0 .. len-1.
struct Run {
  int32_t t;
  int32_t len;
  int64_t step;
  int64_t dst;
};

template <typename T>
struct RowSpmmArgs {
  const int32_t* row_ptr;   ///< [rows + 1] CSR row pointers into col / val.
  const int32_t* col;       ///< [nnz] tap index of each nonzero (into `tap`).
  const int64_t* tap;       ///< [taps] source offset of each tap's strip.
  const int64_t* src_base;  ///< [rows] source offset added for row r (e.g. its group), or nullptr.
  const T* val;             ///< [nnz] nonzero values.
  const T* src;             ///< source buffer; src[src_base + tap + p] readable for p < length.
  int64_t length;           ///< positions per row; a multiple of the vector width.
  const Run* runs;          ///< destination runs of every tile, grouped by class and tile.
  const int32_t* run_index; ///< [nclass * ntiles + 1]: runs of tile i, class c are
                            ///< runs[run_index[c * ntiles + i] .. run_index[c * ntiles + i + 1]).
  int64_t ntiles;           ///< ceil(length / tile_width).
  int64_t nclass;           ///< row r uses class (r % nclass).
  const int64_t* dst_base;  ///< [rows] destination base offset of each row.
  const T* init;            ///< [rows] initial value (bias) of each row, or nullptr for 0.
  T* dst;
  const T* residual;        ///< added to every stored result (same offsets as dst), or nullptr.
  bool relu;                ///< clamp results at 0 after the residual (fused activation).
  int64_t block;            ///< positions per cache block (multiple of the tile width).
  /// Output-row mode (forward convolutions whose output width divides the tile width): when
  /// out_w > 0, positions are compact output pixels q = (n * out_h + i) * out_w + j, each tile
  /// covers tile_width / out_w whole output rows, reads grid rows at n * src_image + i * src_row
  /// and stores its vectors straight to dst_base[r] + n * dst_image + i * out_w + j (runs unused).
  /// No padding columns are computed and no tile is staged through memory.
  int64_t out_w = 0;
  int64_t out_h = 0;
  int64_t src_row = 0;
  int64_t src_image = 0;
  int64_t dst_image = 0;
  /// When > 0, tap c's strip starts at c * tap_stride (tap[] is then not read): the strip layout
  /// of equally spaced strips (tap-major convolution inputs).
  int64_t tap_stride = 0;
  /// Input-channel (L1) blocking.  When tap_chunk > 0, every row's nonzeros are split into
  /// chunks by tap index, [k * tap_chunk, (k + 1) * tap_chunk), and for each cache block of
  /// positions a block of rows runs chunk 0 over all its rows, then chunk 1, and so on: the strips
  /// of one chunk are read by every row of the block while they sit in L1, instead of each row
  /// sweeping the whole input from L2.  Partial sums between chunks go through a small per-thread
  /// buffer.  The split points come from a binary search over each row's columns; columns that are
  /// not sorted are still all used exactly once (only the locality suffers).  Callers size the
  /// position block (`block`) and tap_chunk so that the chunk's strips fit in L1.
  int64_t tap_chunk = 0;
  int64_t tap_chunks = 0;  ///< number of chunks: ceil(taps / tap_chunk).
  /// Rows per row block of the channel-blocked loops (their partial sums, chunk_rows x block
  /// positions, are kept per thread); 0 = as many as fit in 8 KiB.
  int64_t chunk_rows = 0;
};

/// Vector width (elements) of the tiles, identical in both builds so that `length` rounding is
/// independent of the ISA chosen at run time.
template <typename T>
constexpr int64_t vector_width() { return 32 / sizeof(T); }
/// Positions per full register tile.
template <typename T>
constexpr int64_t tile_width() { return 8 * vector_width<T>(); }

void row_spmm_avx512(const RowSpmmArgs<float>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1);
void row_spmm_avx512(const RowSpmmArgs<double>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1);
void row_spmm_avx2(const RowSpmmArgs<float>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1);
void row_spmm_avx2(const RowSpmmArgs<double>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1);
void row_spmm_generic(const RowSpmmArgs<float>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1);
void row_spmm_generic(const RowSpmmArgs<double>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1);

/// Direct NCHW output of the lanes kernel (LanesArgs::direct): image n < m, output channel r,
/// pixel q is stored at y[n * image + r * pixels + q], after adding res at the same offset (when
/// set) and the ReLU (when relu).
template <typename T>
struct LanesDirect {
  T* y;
  const T* res;
  int64_t image, m;
  bool relu;
};

/// Arguments of the images-in-lanes convolution kernel (lanes_impl.h), used for forward
/// convolutions of small maps at batch >= 8: L = units * vector_width images share every vector.
template <typename T>
struct LanesArgs {
  const int32_t* row_ptr;   ///< [rows + 1] CSR row pointers (rows = output channels).
  const int32_t* col;       ///< [nnz] tap index (c * kH * kW + kh * kW + kw) of each nonzero.
  const T* val;             ///< [nnz] nonzero values.
  const int64_t* tap;       ///< [taps] offset of each tap in the input chunk ([C][Hp][Wp][L]).
  const int64_t* src_base;  ///< [rows] offset added for row r (its group), or nullptr.
  const int64_t* pix;       ///< [pixels] offset of each output pixel's window origin in the chunk.
  int64_t pixels;           ///< output pixels per row (OH * OW).
  int64_t units;            ///< 32-byte vectors of images per position: 1, 2 or 4.
  const T* src;             ///< the input chunk.
  const T* init;            ///< [rows] bias, or nullptr.
  T* dst;                   ///< [rows][pixels][L] output chunk.
  /// Input-channel (L1) blocking, as RowSpmmArgs::tap_chunk: when tap_chunk > 0, each block of
  /// output pixels runs every row's nonzeros of taps [0, tap_chunk), then of the next chunk, and
  /// so on, so that the window rows of one chunk's channels stay in L1 while all rows read them.
  /// Partial sums go through dst (the row's own output block).
  int64_t tap_chunk = 0;
  int64_t tap_chunks = 0;  ///< ceil(taps / tap_chunk)
  /// [nnz] source offset of every nonzero (tap[col[j]]), computed once per call by the caller.
  /// 32-bit (the caller keeps a chunk's input under 2^31 elements): half the bytes that the
  /// per-call preparation writes and every block streams, next to the 4-byte values.
  const int32_t* off = nullptr;
  /// With tap_chunk > 0: [rows][tap_chunks + 1] first nonzero of each row in each chunk (the last
  /// entry is the row's end), computed once per call by the caller.
  const int32_t* split = nullptr;
  /// When set (float, one unit of lanes, pixels a multiple of 8 only: the caller checks), finished
  /// blocks are stored straight to NCHW through register transposes, and dst only holds partial
  /// sums between tap chunks.
  const LanesDirect<T>* direct = nullptr;
  /// Tiles of 3 rows x 4 pixels (one unit of lanes, out_w a multiple of 4, the pixels of an output
  /// row at consecutive vectors of pix; the caller checks): output rows [0, tile_rows) (a multiple
  /// of 3) run as tiles, 12 accumulator vectors, so that each weight broadcast feeds 12 FMAs and
  /// the 12 FMA chains leave the FMA units slack over their latency (8 chains of 8-pixel blocks
  /// only just cover it); the rows after tile_rows run as 8-pixel blocks.  0: no tiles.
  int64_t tile_rows = 0;
  int64_t out_w = 0;  ///< output row width (with tile_rows > 0).
  /// With tap_chunk > 0: the 8-pixel blocks of a row run back to back for each chunk of its
  /// nonzeros (the row's nonzeros and the chunk's input channels reused from L1), instead of every
  /// row and chunk for one block, then the next block.
  bool blocks_inner = false;
};

/// Input transpose of the lanes layout: channels of images [0, m) of x (strides s0..s3) into a
/// zero-padded [C][Hp][Wp][L] chunk at dst.
template <typename T>
struct LanesFill {
  const T* x;
  int64_t s0, s1, s2, s3;
  int64_t m, H, W, ph, pw, Hp, Wp, L;
  /// [H * W] offset of input pixel (i, j) in a channel plane: ((i + ph) * Wp + j + pw) * L, or -1
  /// for a pixel that no tap reads (a stride phase no tap falls on: skipped).
  const int64_t* pix;
  T* dst;
  int64_t plane = 0;  ///< elements per channel plane (0: Hp * Wp * L)
  /// When set, the plane is not [Hp][Wp] (stride-phase planes): offsets of its npad padding
  /// positions, zeroed instead of the padding rows and columns.
  const int64_t* pad = nullptr;
  int64_t npad = 0;
};

/// Output transpose of the lanes layout: [K][L] at src to y[n * image + k] for images [0, m),
/// plus res[n * image + k] when res is set, then the ReLU when relu is set.
///
/// With OW > 0, a 2x2 stride-2 max pool (nn.MaxPool2d(2, 2): floor mode, NaN propagates) comes
/// before the store: src holds OH x OW maps (k = (o * OH + i) * OW + j), and y, image and the
/// positions [k0, k1) of lanes_store are those of the pooled OH / 2 x OW / 2 maps.  No residual.
template <typename T>
struct LanesStore {
  const T* src;
  int64_t L, m, image;
  T* y;
  const T* res;
  bool relu;
  int64_t OH = 0, OW = 0;
  /// Residual in src's own layout ([K][L], added before the transpose), instead of res.
  const T* res_lanes = nullptr;
};

void lanes_avx512(const LanesArgs<float>& a, int64_t r0, int64_t r1);
void lanes_avx512(const LanesArgs<double>& a, int64_t r0, int64_t r1);
void lanes_avx2(const LanesArgs<float>& a, int64_t r0, int64_t r1);
void lanes_avx2(const LanesArgs<double>& a, int64_t r0, int64_t r1);
void lanes_generic(const LanesArgs<float>& a, int64_t r0, int64_t r1);
void lanes_generic(const LanesArgs<double>& a, int64_t r0, int64_t r1);
void lanes_fill_avx512(const LanesFill<float>& f, int64_t c0, int64_t c1);
void lanes_store_avx512(const LanesStore<float>& s, int64_t k0, int64_t k1);
void lanes_fill_avx512(const LanesFill<double>& f, int64_t c0, int64_t c1);
void lanes_store_avx512(const LanesStore<double>& s, int64_t k0, int64_t k1);
void lanes_fill_avx2(const LanesFill<float>& f, int64_t c0, int64_t c1);
void lanes_store_avx2(const LanesStore<float>& s, int64_t k0, int64_t k1);
void lanes_fill_avx2(const LanesFill<double>& f, int64_t c0, int64_t c1);
void lanes_store_avx2(const LanesStore<double>& s, int64_t k0, int64_t k1);
void lanes_fill_generic(const LanesFill<float>& f, int64_t c0, int64_t c1);
void lanes_store_generic(const LanesStore<float>& s, int64_t k0, int64_t k1);
void lanes_fill_generic(const LanesFill<double>& f, int64_t c0, int64_t c1);
void lanes_store_generic(const LanesStore<double>& s, int64_t k0, int64_t k1);

/// Instruction sets the kernel is built for, in increasing order.  kGeneric is the portable
/// build (baseline ISA; it uses the same two-vector accumulator layout as kAvx512, so the code
/// shape of the AVX-512 build is exercised on every machine).
enum Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

/// True when the CPU supports AVX2 and FMA (checked once).
bool cpu_has_avx2_fma();
/// True when the CPU (and OS) supports AVX-512 F/VL/DQ/BW (checked once).
bool cpu_has_avx512();
/// Best ISA the CPU supports.
Isa best_isa();
/// ISA the kernel uses now: the best supported one, capped by set_max_isa().
Isa active_isa();
/// Caps the ISA used at run time (tests force each path; benchmarks compare them).  A cap above
/// what the CPU supports uses the best supported ISA.  Returns the ISA active before the call.
Isa set_max_isa(Isa cap);
/// Human-readable name of an ISA ("generic", "avx2", "avx512").
const char* isa_name(Isa isa);

/// Enable (default) or disable the specialised layouts of forward convolutions (output-row tiles,
/// and the tap-major layout for narrow outputs); disabled, every convolution uses the strip
/// layout over the phase grid.  Tests compare both; returns the previous setting.
bool set_row_tiles(bool enable);
bool row_tiles_enabled();

/// Enable (default) or disable input-channel (L1) blocking of forward convolutions (see
/// RowSpmmArgs::tap_chunk).  Tests and benchmarks compare both; returns the previous setting.
bool set_channel_blocking(bool enable);
bool channel_blocking_enabled();

/// The kw-shifted layout of unit-stride forward convolutions with output-row tiles: every
/// (input channel, kw) pair gets its own zero-padded copy of the input, shifted by kw * dilation
/// columns and cropped to the output width, so that every tap reads whole output rows starting at
/// a vector-aligned address (the phase grid's rows are Wq = W + 2 * padding wide, so 15 of 16 of
/// its 64-byte loads cross a cache line).  It costs KW copies of the input per call, which the
/// multiply-adds repay only on denser layers.  Mode 0: never; 1 (default): with AVX-512 active,
/// where the nonzeros per input channel repay the copies (see conv_forward; on AVX2 they did not);
/// 2: wherever the geometry allows it (tests).
/// Returns the previous mode.
int set_shifted_layout(int mode);
int shifted_layout();

/// Enable (default) or disable the images-in-lanes layout of forward convolutions on small maps
/// (LanesArgs); disabled, those use the layouts above.  Tests compare both; returns the previous
/// setting.
bool set_lanes(bool enable);
bool lanes_enabled();

/// Enable (default) or disable the 3-row x 4-pixel tiles of the lanes kernel (LanesArgs::tile_rows);
/// disabled, every block is 8 consecutive pixels.  Tests compare both; returns the previous setting.
bool set_lanes_tiles(bool enable);
bool lanes_tiles_enabled();

/// Order of the lanes kernel's 8-pixel blocks with input-channel blocking (LanesArgs::blocks_inner):
/// true: every block of a row back to back for each chunk of its nonzeros; false: block by block.
bool set_lanes_blocks_inner(bool enable);
bool lanes_blocks_inner();

/// Smallest work (multiply-adds plus elements copied) of one CPU op call that is split across
/// threads; smaller calls run on the calling thread, since waking the thread pool costs tens of
/// microseconds (more on virtual machines whose idle vCPUs are descheduled).  Returns the previous
/// value; benchmarks tune it.
int64_t set_min_parallel_work(int64_t work);
int64_t min_parallel_work();

/// Bytes of freed op outputs kept for reuse (0: none; see sparse_ops.cpp, OutputPool).  Large
/// fresh allocations come from the OS page by page (a page fault per 4 KiB at first touch), which
/// cost up to 2x at batch 1 and 20 % at batch 32 in whole-model timings; reused blocks do not.
/// Returns the previous value; lowering it releases cached blocks above the new cap.
int64_t set_output_cache_bytes(int64_t bytes);
int64_t output_cache_bytes();

/// Runs rows [r0, r1) over positions [p0, p1) with the best ISA available.
template <typename T>
inline void row_spmm(const RowSpmmArgs<T>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  switch (active_isa()) {
    case kAvx512: return row_spmm_avx512(a, r0, r1, p0, p1);
    case kAvx2: return row_spmm_avx2(a, r0, r1, p0, p1);
    default: return row_spmm_generic(a, r0, r1, p0, p1);
  }
}

/// Runs output channels [r0, r1) of the images-in-lanes kernel with the best ISA available.
template <typename T>
inline void lanes(const LanesArgs<T>& a, int64_t r0, int64_t r1) {
  switch (active_isa()) {
    case kAvx512: return lanes_avx512(a, r0, r1);
    case kAvx2: return lanes_avx2(a, r0, r1);
    default: return lanes_generic(a, r0, r1);
  }
}

/// Input / output transposes of the lanes layout with the best ISA available.
template <typename T>
inline void lanes_fill(const LanesFill<T>& f, int64_t c0, int64_t c1) {
  switch (active_isa()) {
    case kAvx512: return lanes_fill_avx512(f, c0, c1);
    case kAvx2: return lanes_fill_avx2(f, c0, c1);
    default: return lanes_fill_generic(f, c0, c1);
  }
}
template <typename T>
inline void lanes_store(const LanesStore<T>& s, int64_t k0, int64_t k1) {
  switch (active_isa()) {
    case kAvx512: return lanes_store_avx512(s, k0, k1);
    case kAvx2: return lanes_store_avx2(s, k0, k1);
    default: return lanes_store_generic(s, k0, k1);
  }
}

}  // namespace kernel
}  // namespace apb_sparse
