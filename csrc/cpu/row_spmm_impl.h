// Body of the row-gather kernel; included by row_spmm_avx2.cpp and row_spmm_generic.cpp, which
// set the target ISA and the function names.  See row_spmm.h for the contract.
#pragma once

#include <cstring>

#include "row_spmm.h"

namespace apb_sparse {
namespace kernel {
namespace APB_ISA_NAMESPACE {

template <typename T>
struct Vec {
  static constexpr int W = 32 / sizeof(T);
  typedef T type __attribute__((vector_size(32)));
};

template <typename V, typename T>
inline V loadu(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
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

template <typename T, int NV, bool kStride>
inline void tile(const Row<T>& row, const int64_t* tap, int64_t stride, int64_t p, int64_t tile_index, bool relu) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  // K independent accumulator sets (nonzero j feeds set j % K): with few vectors per tile a single
  // set would wait on the FMA latency (4-5 cycles) at every nonzero instead of issuing 2 FMAs per
  // cycle.  The sets are summed at the end.
  constexpr int K = NV >= 6 ? 1 : NV >= 3 ? 2 : 4;
  V acc[K][NV];
  for (int k = 0; k < K; ++k)
    for (int v = 0; v < NV; ++v) acc[k][v] = V{};
  const T* src = row.src + p;
  int32_t j = 0;
  for (; j + K <= row.nnz; j += K) {
    for (int k = 0; k < K; ++k) {
      const V w = broadcast<V, T>(row.val[j + k]);
      const T* s = src + tap_offset<kStride>(tap, stride, row.col[j + k]);
      for (int v = 0; v < NV; ++v) acc[k][v] += w * loadu<V, T>(s + v * W);
    }
  }
  for (int k = 0; j < row.nnz; ++j, ++k) {
    const V w = broadcast<V, T>(row.val[j]);
    const T* s = src + tap_offset<kStride>(tap, stride, row.col[j]);
    for (int v = 0; v < NV; ++v) acc[k][v] += w * loadu<V, T>(s + v * W);
  }
  for (int k = 1; k < K; ++k)
    for (int v = 0; v < NV; ++v) acc[0][v] += acc[k][v];
  const V init = broadcast<V, T>(row.init);
  for (int v = 0; v < NV; ++v) acc[0][v] += init;
  alignas(32) T buf[NV * W];
  const bool clamp = relu && row.res == nullptr;
  for (int v = 0; v < NV; ++v) {
    if (clamp) acc[0][v] = acc[0][v] < V{} ? V{} : acc[0][v];  // NaN stays NaN, as torch.relu
    std::memcpy(buf + v * W, &acc[0][v], sizeof(V));
  }
  store_runs(row, buf, tile_index, relu);
}

/// Output-row mode tile: RPT output rows of VPR vectors each (RPT * VPR = 8 vectors), starting at
/// grid offset `src` (row pitch `pitch`) and stored at `dst` (row pitch VPR * W).
template <typename T, int RPT, int VPR>
inline void tile_rows(const Row<T>& row, const int64_t* tap, int64_t src, int64_t pitch, int64_t dst, bool relu) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V acc[RPT][VPR];
  for (int i = 0; i < RPT; ++i)
    for (int v = 0; v < VPR; ++v) acc[i][v] = V{};
  const T* base = row.src + src;
  for (int32_t j = 0; j < row.nnz; ++j) {
    const V w = broadcast<V, T>(row.val[j]);
    const T* s = base + tap[row.col[j]];
    for (int i = 0; i < RPT; ++i)
      for (int v = 0; v < VPR; ++v) acc[i][v] += w * loadu<V, T>(s + i * pitch + v * W);
  }
  const V init = broadcast<V, T>(row.init);
  T* d = row.dst + dst;
  const T* res = row.res ? row.res + dst : nullptr;
  for (int i = 0; i < RPT; ++i)
    for (int v = 0; v < VPR; ++v) {
      V y = acc[i][v] + init;
      const int64_t o = i * VPR * W + v * W;
      if (res) y += loadu<V, T>(res + o);
      if (relu) y = y < V{} ? V{} : y;  // NaN stays NaN
      std::memcpy(d + o, &y, sizeof(V));
    }
}

/// Tiles per sub-block whose grid and output offsets are computed once and shared by all rows
/// (the divisions that locate a tile would otherwise run once per row and tile).
constexpr int64_t kTilesPerSub = 32;

template <typename T, int RPT, int VPR>
void run_rows(const RowSpmmArgs<T>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  constexpr int TW = 8 * Vec<T>::W;
  const int64_t block = a.block > 0 ? a.block : TW;
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
      for (int64_t r = r0; r < r1; ++r) {
        const int32_t jb = a.row_ptr[r];
        const Row<T> row{a.col + jb, a.val + jb, a.row_ptr[r + 1] - jb,
                         a.src + (a.src_base ? a.src_base[r] : 0), a.init ? a.init[r] : T(0),
                         a.dst + a.dst_base[r], a.residual ? a.residual + a.dst_base[r] : nullptr,
                         nullptr, nullptr};
        for (int64_t t = 0; t < nt; ++t) tile_rows<T, RPT, VPR>(row, a.tap, soff[t], a.src_row, doff[t], a.relu);
      }
    }
  }
}

template <typename T, bool kStride>
void run_strip(const RowSpmmArgs<T>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1);

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

template <typename T, bool kStride>
void run_strip(const RowSpmmArgs<T>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  constexpr int W = Vec<T>::W;
  constexpr int TW = 8 * W;
  const int64_t block = a.block > 0 ? a.block : TW;
  const int64_t st = a.tap_stride;
  for (int64_t pb = p0; pb < p1; pb += block) {
    const int64_t pe = pb + block < p1 ? pb + block : p1;
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t jb = a.row_ptr[r];
      const int64_t cls = a.nclass > 1 ? r % a.nclass : 0;
      const Row<T> row{a.col + jb, a.val + jb, a.row_ptr[r + 1] - jb,
                       a.src + (a.src_base ? a.src_base[r] : 0), a.init ? a.init[r] : T(0),
                       a.dst + a.dst_base[r], a.residual ? a.residual + a.dst_base[r] : nullptr,
                       a.runs, a.run_index + cls * a.ntiles};
      int64_t p = pb;
      for (; p + TW <= pe; p += TW) tile<T, 8, kStride>(row, a.tap, st, p, p / TW, a.relu);
      const int64_t t = p / TW;
      switch ((pe - p) / W) {
        case 7: tile<T, 7, kStride>(row, a.tap, st, p, t, a.relu); break;
        case 6: tile<T, 6, kStride>(row, a.tap, st, p, t, a.relu); break;
        case 5: tile<T, 5, kStride>(row, a.tap, st, p, t, a.relu); break;
        case 4: tile<T, 4, kStride>(row, a.tap, st, p, t, a.relu); break;
        case 3: tile<T, 3, kStride>(row, a.tap, st, p, t, a.relu); break;
        case 2: tile<T, 2, kStride>(row, a.tap, st, p, t, a.relu); break;
        case 1: tile<T, 1, kStride>(row, a.tap, st, p, t, a.relu); break;
        default: break;
      }
    }
  }
}

}  // namespace APB_ISA_NAMESPACE
}  // namespace kernel
}  // namespace apb_sparse
