// Body of the row-gather kernel; included by row_spmm_avx2.cpp and row_spmm_generic.cpp, which
// set the target ISA and the function names.  See row_spmm.h for the contract.
#pragma once

#include <cstring>

#include "row_spmm.h"

namespace apb_sparse {
namespace kernel {
namespace APB_ISA_NAMESPACE {

/// The unit of positions: one 32-byte vector (8 floats, 4 doubles), the same in every build so
/// that tile shapes and `length` rounding do not depend on the ISA chosen at run time.
template <typename T>
struct Vec {
  static constexpr int W = 32 / sizeof(T);
  typedef T type __attribute__((vector_size(32)));
};

/// Accumulator vectors of B bytes.  Builds with APB_WIDE_VECTORS (AVX-512, and the portable
/// build so that this code shape is tested everywhere) hold two units per 64-byte vector where a
/// tile's units are contiguous; the others use one 32-byte vector per unit.
template <typename T, int B>
struct VecB {
  static constexpr int W = B / sizeof(T);
  typedef T type __attribute__((vector_size(B)));
};
#ifdef APB_WIDE_VECTORS
constexpr bool kWide = true;
#else
constexpr bool kWide = false;
#endif
/// Bytes of the accumulator vector for runs of n contiguous units.
constexpr int acc_bytes(int n) { return kWide && n % 2 == 0 ? 64 : 32; }

template <typename V, typename T>
inline V loadu(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

/// Stores v at p (unaligned).  By value, so that arrays of accumulators stored in a loop stay in
/// registers (memcpy from an array element had GCC keep the array on the stack and copy it in
/// 16-byte pieces).
template <typename T, typename V>
inline void storeu(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V, typename T>
inline V broadcast(T x) {
  // vector + scalar splats the scalar (one vbroadcast); an element-wise loop does not vectorise.
  return x - V{};  // x - (+0) == x exactly, so the subtraction folds away
}

/// Per-row constants of the kernel.
template <typename T>
struct Row {
  const int32_t* col;
  const T* val;
  int32_t nnz;
  const T* src;        ///< row source base (src + src_base[r])
  T init;
  T* dst;              ///< dst + dst_base[r]
  const T* res;        ///< residual + dst_base[r], or nullptr
  const Run* runs;     ///< this row's class's runs
  const int32_t* idx;  ///< this row's class's run_index
  /// Output-row mode: source offset of each of this row's nonzeros (tap[col[j]], looked up once
  /// per row and cache block instead of once per nonzero and tile), or nullptr.
  const int64_t* off = nullptr;
};

/// Stores positions [t, t + len) of a finished tile (in buf) as the tile's runs say.
template <typename T>
inline void store_runs(const Row<T>& row, const T* buf, int64_t tile, bool relu) {
  const int32_t rb = row.idx[tile], re = row.idx[tile + 1];
  for (int32_t q = rb; q < re; ++q) {
    const Run& u = row.runs[q];
    const T* b = buf + u.t;
    T* d = row.dst + u.dst;
    if (row.res == nullptr) {
      if (u.step == 1) {
        // Fixed-size vector moves (no libc call per run; see the flags in setup.py).
        using V = typename Vec<T>::type;
        constexpr int W = Vec<T>::W;
        int32_t k = 0;
        for (; k + W <= u.len; k += W) std::memcpy(d + k, b + k, sizeof(V));
        for (; k < u.len; ++k) d[k] = b[k];
      } else {
        for (int32_t k = 0; k < u.len; ++k) d[k * u.step] = b[k];
      }
    } else {
      const T* r = row.res + u.dst;
      for (int32_t k = 0; k < u.len; ++k) {
        const T y = b[k] + r[k * u.step];
        d[k * u.step] = (relu && y < T(0)) ? T(0) : y;
      }
    }
  }
}

/// One register tile: NV vectors of consecutive positions starting at p (tile index p / TW).
/// The source offset of tap `c`: a table lookup, or (kStride: tap-major layouts, whose strips
/// are equally spaced) one multiply, which saves a dependent load per nonzero.
template <bool kStride>
inline int64_t tap_offset(const int64_t* tap, int64_t stride, int32_t c) {
  return kStride ? int64_t(c) * stride : tap[c];
}

/// One register tile of NV units (NV * Vec<T>::W consecutive positions starting at p; tile index
/// p / TW).  acc_in: partial sums of the previous tap chunks (nullptr: start from 0); acc_out:
/// when set, the partial sums are written there and the epilogue is left to a later chunk.
template <typename T, int NV, bool kStride>
inline void tile(const Row<T>& row, const int64_t* tap, int64_t stride, int64_t p, int64_t tile_index, bool relu,
                 const T* acc_in = nullptr, T* acc_out = nullptr) {
  using U = VecB<T, acc_bytes(NV)>;
  using V = typename U::type;
  constexpr int W = U::W;
  constexpr int N = NV * Vec<T>::W / W;  // accumulator vectors
  // K independent accumulator sets (nonzero j feeds set j % K): with few vectors per tile a single
  // set would wait on the FMA latency (4-5 cycles) at every nonzero instead of issuing 2 FMAs per
  // cycle.  The sets are summed at the end.
  constexpr int K = N >= 6 ? 1 : N >= 3 ? 2 : 4;
  V acc[K][N];
  for (int k = 0; k < K; ++k)
    for (int v = 0; v < N; ++v) acc[k][v] = (k == 0 && acc_in) ? loadu<V, T>(acc_in + v * W) : V{};
  const T* src = row.src + p;
  int32_t j = 0;
  for (; j + K <= row.nnz; j += K) {
    for (int k = 0; k < K; ++k) {
      const V w = broadcast<V, T>(row.val[j + k]);
      const T* s = src + tap_offset<kStride>(tap, stride, row.col[j + k]);
      for (int v = 0; v < N; ++v) acc[k][v] += w * loadu<V, T>(s + v * W);
    }
  }
  for (int k = 0; j < row.nnz; ++j, ++k) {
    const V w = broadcast<V, T>(row.val[j]);
    const T* s = src + tap_offset<kStride>(tap, stride, row.col[j]);
    for (int v = 0; v < N; ++v) acc[k][v] += w * loadu<V, T>(s + v * W);
  }
  for (int k = 1; k < K; ++k)
    for (int v = 0; v < N; ++v) acc[0][v] += acc[k][v];
  if (acc_out) {
    for (int v = 0; v < N; ++v) std::memcpy(acc_out + v * W, &acc[0][v], sizeof(V));
    return;
  }
  const V init = broadcast<V, T>(row.init);
  for (int v = 0; v < N; ++v) acc[0][v] += init;
  alignas(64) T buf[N * W];
  const bool clamp = relu && row.res == nullptr;
  for (int v = 0; v < N; ++v) {
    if (clamp) acc[0][v] = acc[0][v] < V{} ? V{} : acc[0][v];  // NaN stays NaN, as torch.relu
    std::memcpy(buf + v * W, &acc[0][v], sizeof(V));
  }
  store_runs(row, buf, tile_index, relu);
}

/// Output-row mode tile: RPT output rows of VPR units each (RPT * VPR = 8 units), starting at
/// grid offset `src` (row pitch `pitch`) and stored at `dst` (row pitch VPR * W).  acc_in /
/// acc_out: as for tile().
template <typename T, int RPT, int VPR>
inline void tile_rows(const Row<T>& row, int64_t src, int64_t pitch, int64_t dst, bool relu,
                      const T* acc_in = nullptr, T* acc_out = nullptr) {
  using U = VecB<T, acc_bytes(VPR)>;
  using V = typename U::type;
  constexpr int W = U::W;
  constexpr int N = VPR * Vec<T>::W / W;  // accumulator vectors per output row
  constexpr int RW = VPR * Vec<T>::W;     // positions per output row
  // K independent accumulator sets (nonzero j feeds set j % K), summed at the end: with RPT * N
  // = 4 accumulators (the wide-vector builds) one set waits on the FMA latency (4 cycles) at every
  // nonzero, i.e. runs at most 1 FMA per cycle where the core can issue 2.
  constexpr int K = RPT * N >= 8 ? 1 : 2;
  V acc[K][RPT][N];
  for (int k = 0; k < K; ++k)
    for (int i = 0; i < RPT; ++i)
      for (int v = 0; v < N; ++v) acc[k][i][v] = (k == 0 && acc_in) ? loadu<V, T>(acc_in + i * RW + v * W) : V{};
  // One base pointer per output row (no row-pitch arithmetic per nonzero), and pointer walks
  // over the values and offsets (no index extension per nonzero).
  const T* base[RPT];
  for (int i = 0; i < RPT; ++i) base[i] = row.src + src + i * pitch;
  const T* vp = row.val;
  const int64_t* op = row.off;
  const T* const vend = row.val + row.nnz;
  for (; vp + K <= vend; vp += K, op += K) {
    for (int k = 0; k < K; ++k) {
      const V w = broadcast<V, T>(vp[k]);
      const int64_t o = op[k];
      for (int i = 0; i < RPT; ++i)
        for (int v = 0; v < N; ++v) acc[k][i][v] += w * loadu<V, T>(base[i] + o + v * W);
    }
  }
  for (; vp < vend; ++vp, ++op) {
    const V w = broadcast<V, T>(*vp);
    const int64_t o = *op;
    for (int i = 0; i < RPT; ++i)
      for (int v = 0; v < N; ++v) acc[K - 1][i][v] += w * loadu<V, T>(base[i] + o + v * W);
  }
  for (int k = 1; k < K; ++k)
    for (int i = 0; i < RPT; ++i)
      for (int v = 0; v < N; ++v) acc[0][i][v] += acc[k][i][v];
  if (acc_out) {
    for (int i = 0; i < RPT; ++i)
      for (int v = 0; v < N; ++v) std::memcpy(acc_out + i * RW + v * W, &acc[0][i][v], sizeof(V));
    return;
  }
  const V init = broadcast<V, T>(row.init);
  T* d = row.dst + dst;
  const T* res = row.res ? row.res + dst : nullptr;
  for (int i = 0; i < RPT; ++i)
    for (int v = 0; v < N; ++v) {
      V y = acc[0][i][v] + init;
      const int64_t o = i * RW + v * W;
      if (res) y += loadu<V, T>(res + o);
      if (relu) y = y < V{} ? V{} : y;  // NaN stays NaN
      std::memcpy(d + o, &y, sizeof(V));
    }
}

/// Tiles per sub-block whose grid and output offsets are computed once and shared by all rows
/// (the divisions that locate a tile would otherwise run once per row and tile).
constexpr int64_t kTilesPerSub = 32;
/// Register tiles of partial sums of one row block of the channel-blocked loops (8 KiB): small
/// enough to stay in L1 next to the chunk's strips (128 tiles measured slower at 8x8 maps).
constexpr int64_t kAccTiles = 32;

/// Split points of rows [rb, re) into nk tap chunks of `chunk` taps: split[(r - rb) * (nk + 1) + k]
/// is the first nonzero of row r in chunk k (binary search for the first column >= k * chunk).
/// The points are monotone by construction, so every nonzero falls in exactly one chunk even when
/// a row's columns are not sorted.
inline void chunk_splits(const int32_t* row_ptr, const int32_t* col, int64_t rb, int64_t re, int64_t chunk,
                         int64_t nk, int32_t* split) {
  for (int64_t r = rb; r < re; ++r) {
    int32_t* sp = split + (r - rb) * (nk + 1);
    const int32_t jb = row_ptr[r], je = row_ptr[r + 1];
    sp[0] = jb;
    sp[nk] = je;
    int32_t lo = jb;
    for (int64_t k = 1; k < nk; ++k) {
      const int64_t c = k * chunk;
      int32_t x = lo, y = je;
      while (x < y) {
        const int32_t m = x + (y - x) / 2;
        if (col[m] < c) x = m + 1; else y = m;
      }
      sp[k] = lo = x;
    }
  }
}

/// Per-thread buffers of the channel-blocked loops, kept between calls.  Raw arrays on purpose:
/// this header is compiled under several target ISAs, and an inline library template (std::vector)
/// instantiated here could be emitted with AVX-512 code and then picked by the linker for the
/// other builds too.
template <typename T>
struct ChunkScratch {
  T* acc = nullptr;
  int32_t* split = nullptr;
  int64_t* off = nullptr;
  int64_t acc_size = 0, split_size = 0, off_size = 0;
  ~ChunkScratch() {
    delete[] acc;
    delete[] split;
    delete[] off;
  }
  /// The per-nonzero offset buffer, at least `need` entries.
  int64_t* offsets(int64_t need) {
    if (off_size < need) {
      delete[] off;
      off = new int64_t[need];
      off_size = need;
    }
    return off;
  }
  static ChunkScratch& get(int64_t acc_need, int64_t split_need) {
    thread_local ChunkScratch s;
    if (s.acc_size < acc_need) {
      delete[] s.acc;
      s.acc = new T[acc_need];
      s.acc_size = acc_need;
    }
    if (s.split_size < split_need) {
      delete[] s.split;
      s.split = new int32_t[split_need];
      s.split_size = split_need;
    }
    return s;
  }
};

inline int64_t imin(int64_t x, int64_t y) { return x < y ? x : y; }
inline int64_t imax(int64_t x, int64_t y) { return x > y ? x : y; }

template <typename T>
inline Row<T> make_row(const RowSpmmArgs<T>& a, int64_t r, int32_t jb, int32_t je, const Run* runs,
                       const int32_t* idx) {
  return Row<T>{a.col + jb, a.val + jb, je - jb, a.src + (a.src_base ? a.src_base[r] : 0), a.init ? a.init[r] : T(0),
                a.dst + a.dst_base[r], a.residual ? a.residual + a.dst_base[r] : nullptr, runs, idx};
}

template <typename T, int RPT, int VPR>
void run_rows(const RowSpmmArgs<T>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  constexpr int TW = 8 * Vec<T>::W;
  const int64_t block = a.block > 0 ? a.block : TW;
  const int64_t nk = a.tap_chunk > 0 ? a.tap_chunks : 1;
  const int64_t sub_tiles = imin(kTilesPerSub, (block + TW - 1) / TW);
  const int64_t rbn = nk > 1 ? (a.chunk_rows > 0 ? a.chunk_rows : imax(1, kAccTiles / sub_tiles)) : r1 - r0;
  ChunkScratch<T>& cs = ChunkScratch<T>::get(nk > 1 ? imax(kAccTiles, rbn * sub_tiles) * TW : 0,
                                             nk > 1 ? rbn * (nk + 1) : 0);
  // Source offsets of the nonzeros of rows [rb, re): entry j - row_ptr[rb] for nonzero j.
  auto fill_offsets = [&](int64_t rb, int64_t re) {
    const int32_t jb = a.row_ptr[rb], je = a.row_ptr[re];
    int64_t* off = cs.offsets(je - jb);
    for (int32_t j = jb; j < je; ++j) off[j - jb] = a.tap[a.col[j]];
    return off;
  };
  int64_t soff[kTilesPerSub], doff[kTilesPerSub];
  for (int64_t pb = p0; pb < p1; pb += block) {
    const int64_t pe = pb + block < p1 ? pb + block : p1;
    for (int64_t sb = pb; sb < pe; sb += kTilesPerSub * TW) {
      const int64_t se = sb + kTilesPerSub * TW < pe ? sb + kTilesPerSub * TW : pe;
      int64_t nt = 0;
      for (int64_t p = sb; p < se; p += TW, ++nt) {
        const int64_t flat = p / a.out_w;  // first output row of the tile (n * out_h + i)
        const int64_t n = flat / a.out_h, i = flat % a.out_h;
        soff[nt] = n * a.src_image + i * a.src_row;
        doff[nt] = n * a.dst_image + i * a.out_w;
      }
      if (nk == 1) {
        for (int64_t r = r0; r < r1; ++r) {
          Row<T> row = make_row(a, r, a.row_ptr[r], a.row_ptr[r + 1], nullptr, nullptr);
          row.off = fill_offsets(r, r + 1);
          for (int64_t t = 0; t < nt; ++t) tile_rows<T, RPT, VPR>(row, soff[t], a.src_row, doff[t], a.relu);
        }
        continue;
      }
      // Channel-blocked: rows [rb, re) run tap chunk 0, then chunk 1, ...; partial sums of row r,
      // tile t live at acc[((r - rb) * nt + t) * TW].
      for (int64_t rb = r0; rb < r1; rb += rbn) {
        const int64_t re = imin(rb + rbn, r1);
        int32_t* split = cs.split;
        chunk_splits(a.row_ptr, a.col, rb, re, a.tap_chunk, nk, split);
        const int64_t* off = fill_offsets(rb, re);
        for (int64_t k = 0; k < nk; ++k) {
          for (int64_t r = rb; r < re; ++r) {
            const int32_t* sp = split + (r - rb) * (nk + 1);
            Row<T> row = make_row(a, r, sp[k], sp[k + 1], nullptr, nullptr);
            row.off = off + (sp[k] - a.row_ptr[rb]);
            T* acc = cs.acc + (r - rb) * nt * TW;
            for (int64_t t = 0; t < nt; ++t)
              tile_rows<T, RPT, VPR>(row, soff[t], a.src_row, doff[t], a.relu,
                                     k == 0 ? nullptr : acc + t * TW, k == nk - 1 ? nullptr : acc + t * TW);
          }
        }
      }
    }
  }
}

/// All tiles of one row over positions [pb, pe) of the strip layout.  acc (or nullptr): partial
/// sums of the tiles, TW per tile; `first` / `last`: this is the row's first / last tap chunk.
template <typename T, bool kStride>
inline void strip_row(const RowSpmmArgs<T>& a, const Row<T>& row, int64_t pb, int64_t pe, T* acc, bool first,
                      bool last) {
  constexpr int W = Vec<T>::W;
  constexpr int TW = 8 * W;
  const int64_t st = a.tap_stride;
  int64_t p = pb;
  const T* ai = nullptr;
  T* ao = nullptr;
  auto at = [&](int64_t q) {
    ai = (acc && !first) ? acc + (q - pb) : nullptr;
    ao = (acc && !last) ? acc + (q - pb) : nullptr;
  };
  for (; p + TW <= pe; p += TW) {
    at(p);
    tile<T, 8, kStride>(row, a.tap, st, p, p / TW, a.relu, ai, ao);
  }
  const int64_t t = p / TW;
  at(p);
  switch ((pe - p) / W) {
    case 7: tile<T, 7, kStride>(row, a.tap, st, p, t, a.relu, ai, ao); break;
    case 6: tile<T, 6, kStride>(row, a.tap, st, p, t, a.relu, ai, ao); break;
    case 5: tile<T, 5, kStride>(row, a.tap, st, p, t, a.relu, ai, ao); break;
    case 4: tile<T, 4, kStride>(row, a.tap, st, p, t, a.relu, ai, ao); break;
    case 3: tile<T, 3, kStride>(row, a.tap, st, p, t, a.relu, ai, ao); break;
    case 2: tile<T, 2, kStride>(row, a.tap, st, p, t, a.relu, ai, ao); break;
    case 1: tile<T, 1, kStride>(row, a.tap, st, p, t, a.relu, ai, ao); break;
    default: break;
  }
}

template <typename T, bool kStride>
void run_strip(const RowSpmmArgs<T>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  constexpr int TW = 8 * Vec<T>::W;
  const int64_t block = a.block > 0 ? a.block : TW;
  const int64_t nk = a.tap_chunk > 0 ? a.tap_chunks : 1;
  const int64_t tiles = (block + TW - 1) / TW;
  // Partial sums of one row take `tiles` tile slots (strip positions pb.. are at acc + p - pb).
  const int64_t rbn = nk > 1 ? (a.chunk_rows > 0 ? a.chunk_rows : imax(1, kAccTiles / tiles)) : r1 - r0;
  ChunkScratch<T>* cs =
      nk > 1 ? &ChunkScratch<T>::get(imax(kAccTiles, rbn * tiles) * TW, rbn * (nk + 1)) : nullptr;
  for (int64_t pb = p0; pb < p1; pb += block) {
    const int64_t pe = pb + block < p1 ? pb + block : p1;
    if (nk == 1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t cls = a.nclass > 1 ? r % a.nclass : 0;
        const Row<T> row = make_row(a, r, a.row_ptr[r], a.row_ptr[r + 1], a.runs, a.run_index + cls * a.ntiles);
        strip_row<T, kStride>(a, row, pb, pe, nullptr, true, true);
      }
      continue;
    }
    for (int64_t rb = r0; rb < r1; rb += rbn) {
      const int64_t re = imin(rb + rbn, r1);
      int32_t* split = cs->split;
      chunk_splits(a.row_ptr, a.col, rb, re, a.tap_chunk, nk, split);
      for (int64_t k = 0; k < nk; ++k) {
        for (int64_t r = rb; r < re; ++r) {
          const int32_t* sp = split + (r - rb) * (nk + 1);
          const int64_t cls = a.nclass > 1 ? r % a.nclass : 0;
          const Row<T> row = make_row(a, r, sp[k], sp[k + 1], a.runs, a.run_index + cls * a.ntiles);
          strip_row<T, kStride>(a, row, pb, pe, cs->acc + (r - rb) * tiles * TW, k == 0, k == nk - 1);
        }
      }
    }
  }
}

template <typename T>
void run(const RowSpmmArgs<T>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  if (a.out_w > 0) {
    constexpr int W = Vec<T>::W;
    switch (a.out_w / W) {
      case 8: return run_rows<T, 1, 8>(a, r0, r1, p0, p1);
      case 4: return run_rows<T, 2, 4>(a, r0, r1, p0, p1);
      case 2: return run_rows<T, 4, 2>(a, r0, r1, p0, p1);
      case 1: return run_rows<T, 8, 1>(a, r0, r1, p0, p1);
      default: return;  // callers only enable this mode for these widths
    }
  }
  if (a.tap_stride > 0) return run_strip<T, true>(a, r0, r1, p0, p1);
  return run_strip<T, false>(a, r0, r1, p0, p1);
}

}  // namespace APB_ISA_NAMESPACE
}  // namespace kernel
}  // namespace apb_sparse
