// Row-gather sparse kernel shared by every CPU op of apb_sparse.
//
// All sparse convolutions (forward and backward-to-input) and sparse linear layers are rewritten
// as one primitive: for every sparse row r and every position p of a contiguous strip,
//
//     d = dst_base[r] + omap[cls(r)][p]
//     dst[d] = act( init[r] + sum_{j in row r} val[j] * src[off[j] + p]  + residual[d] )
//
// where off[j] is a precomputed offset of the j-th nonzero's input strip (for a convolution: the
// input plane of its channel, already shifted by its (kh, kw) tap).  Inner loop: broadcast one
// weight and FMA it into a register tile of NV vectors of consecutive positions, so the cost is
// one vector load + one FMA per nonzero and vector: no im2col, no index arithmetic per position.
//
// This header includes no torch headers on purpose: it is compiled twice, once for AVX2+FMA and
// once for the baseline ISA, and the two objects must not share inline torch code.
#pragma once

#include <cstdint>

namespace apb_sparse {
namespace kernel {

template <typename T>
struct RowSpmmArgs {
  const int32_t* row_ptr;   ///< [rows + 1] CSR row pointers into off / val.
  const int64_t* off;       ///< [nnz] source offset of each nonzero's strip.
  const T* val;             ///< [nnz] nonzero values.
  const T* src;             ///< source buffer; src[off[j] + p] must be readable for p < length.
  int64_t length;           ///< positions per row; a multiple of the vector width.
  const int64_t* omap;      ///< [nclass][length] destination offset per position, -1 = not stored.
  int64_t nclass;           ///< row r uses omap row (r % nclass).
  const int64_t* dst_base;  ///< [rows] destination base offset of each row.
  const T* init;            ///< [rows] initial value (bias) of each row, or nullptr for 0.
  T* dst;
  const T* residual;        ///< added to every stored result (same offsets as dst), or nullptr.
  bool relu;                ///< clamp results at 0 after the residual (fused activation).
  int64_t block;            ///< positions per cache block (multiple of the tile width).
};

/// Vector width (elements) of the tiles, identical in both builds so that `length` rounding is
/// independent of the ISA chosen at run time.
template <typename T>
constexpr int64_t vector_width() { return 32 / sizeof(T); }
/// Positions per full register tile.
template <typename T>
constexpr int64_t tile_width() { return 8 * vector_width<T>(); }

void row_spmm_avx2(const RowSpmmArgs<float>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1);
void row_spmm_avx2(const RowSpmmArgs<double>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1);
void row_spmm_generic(const RowSpmmArgs<float>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1);
void row_spmm_generic(const RowSpmmArgs<double>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1);

/// True when the CPU supports AVX2 and FMA (checked once).
bool cpu_has_avx2_fma();

/// Force the portable path (tests compare both paths); returns the previous setting.
bool set_force_generic(bool force);
bool force_generic();

/// Runs rows [r0, r1) over positions [p0, p1) with the best ISA available.
template <typename T>
inline void row_spmm(const RowSpmmArgs<T>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  if (!force_generic() && cpu_has_avx2_fma()) {
    row_spmm_avx2(a, r0, r1, p0, p1);
  } else {
    row_spmm_generic(a, r0, r1, p0, p1);
  }
}

}  // namespace kernel
}  // namespace apb_sparse
