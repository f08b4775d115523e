// Body of the images-in-lanes convolution kernel (see LanesArgs in row_spmm.h); included by the
// three ISA builds after row_spmm_impl.h, whose vector helpers it uses.
//
// Layout: the input chunk holds L images per position, [C][Hp][Wp][L] (zero padded), so the
// value that tap (c, kh, kw) reads for output pixel (oh, ow) is a contiguous vector of L images
// at src + pix[q] + tap[t].  Every nonzero of an output channel is then one broadcast and L / W
// vector FMAs per output pixel, whatever the map size: 4x4 and 2x2 maps waste no lanes and need
// no im2col.  A register block is PB output pixels x L images (8 accumulator vectors), so one
// weight broadcast feeds PB * L / W FMAs.
#pragma once

#include <vector>

#include "row_spmm_impl.h"

namespace apb_sparse {
namespace kernel {
namespace APB_ISA_NAMESPACE {

/// 8x8 transpose of float vectors in place: v[i][j] -> v[j][i] (three shuffle stages).
inline void transpose8(typename Vec<float>::type (&v)[8]) {
  using V = typename Vec<float>::type;
  using M = int __attribute__((vector_size(32)));
  V t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(v[i], v[i + 1], M{0, 8, 1, 9, 4, 12, 5, 13});
    t[i + 1] = __builtin_shuffle(v[i], v[i + 1], M{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shuffle(t[i], t[i + 2], M{0, 1, 8, 9, 4, 5, 12, 13});
    u[i + 1] = __builtin_shuffle(t[i], t[i + 2], M{2, 3, 10, 11, 6, 7, 14, 15});
    u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], M{0, 1, 8, 9, 4, 5, 12, 13});
    u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], M{2, 3, 10, 11, 6, 7, 14, 15});
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = __builtin_shuffle(u[i], u[i + 4], M{0, 1, 2, 3, 8, 9, 10, 11});
    v[i + 4] = __builtin_shuffle(u[i], u[i + 4], M{4, 5, 6, 7, 12, 13, 14, 15});
  }
}

/// Stores a finished block of 8 consecutive pixels x 8 images (acc[p] holds pixel p's images) of
/// one output channel (NCHW offset off of image 0) straight to NCHW through one 8x8 register transpose: one 32-byte store per
/// image instead of a trip through the chunk's output buffer and a separate transpose pass.
template <typename T>
inline void store_direct(typename Vec<float>::type (&acc)[8], const LanesDirect<T>& d, int64_t off) {
  using V = typename Vec<float>::type;
  transpose8(acc);
  for (int64_t n = 0; n < d.m; ++n) {
    V o = acc[n];
    if (d.res) o += loadu<V, T>(d.res + n * d.image + off);
    if (d.relu) o = o < V{} ? V{} : o;  // NaN stays NaN, as torch.relu
    std::memcpy(d.y + n * d.image + off, &o, sizeof(V));
  }
}

/// PB output pixels (pixel table entries q .. q + PB) of one output channel.  NU: units (32-byte
/// vectors) of lanes per pixel; the output block is stored at dst (pixel stride NU * unit).
/// off[j]: source offset of nonzero j (its tap's), computed once per call (LanesArgs::off).
/// first: start from zero (else from the partial sums in dst); last: add init and finish.
/// direct (float, one unit, 8 pixels only): finished blocks go straight to NCHW at out_off.
template <typename T, int NU, int PB>
inline void lanes_block(const int32_t* off, const T* val, int32_t nnz, const T* src, const int64_t* pix, T init,
                        T* dst, bool first = true, bool last = true, const LanesDirect<T>* direct = nullptr,
                        int64_t out_off = 0) {
  using U = VecB<T, acc_bytes(NU)>;
  using V = typename U::type;
  constexpr int W = U::W;
  constexpr int N = NU * Vec<T>::W / W;  // accumulator vectors per pixel
  constexpr int L = NU * Vec<T>::W;      // lanes (images) per pixel
  const T* s[PB];
  for (int p = 0; p < PB; ++p) s[p] = src + pix[p];
  // The accumulator loops fully unrolled (GCC unroll pragmas), or acc lives on the stack.
  V acc[PB][N];
#pragma GCC unroll 8
  for (int p = 0; p < PB; ++p)
#pragma GCC unroll 4
    for (int v = 0; v < N; ++v) acc[p][v] = first ? V{} : loadu<V, T>(dst + p * L + v * W);
  for (int32_t j = 0; j < nnz; ++j) {
    const V w = broadcast<V, T>(val[j]);
    const int64_t o = off[j];
#pragma GCC unroll 8
    for (int p = 0; p < PB; ++p)
#pragma GCC unroll 4
      for (int v = 0; v < N; ++v) acc[p][v] += w * loadu<V, T>(s[p] + o + v * W);
  }
  const V b = broadcast<V, T>(last ? init : T(0));
  if constexpr (sizeof(T) == 4 && N == 1 && W == 8 && PB == 8) {
    if (last && direct) {
      typename Vec<float>::type blk[8];
#pragma GCC unroll 8
      for (int p = 0; p < 8; ++p) blk[p] = acc[p][0] + b;
      return store_direct(blk, *direct, out_off);
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < PB; ++p)
#pragma GCC unroll 4
    for (int v = 0; v < N; ++v) storeu(dst + p * L + v * W, acc[p][v] + b);
}

/// Pixels [q, P) of a row after its last full block of PB (pixel table pix, output block at dst):
/// one block of 4 when PB is larger, then single pixels.
template <typename T, int NU, int PB>
inline void lanes_tail(const int32_t* off, const T* val, int32_t nnz, const T* src, const int64_t* pix, T init,
                       T* dst, int64_t q, int64_t P, bool first, bool last) {
  constexpr int L = NU * Vec<T>::W;
  int64_t u = q;
  if constexpr (PB > 4) {
    if (u + 4 <= P) {
      lanes_block<T, NU, 4>(off, val, nnz, src, pix + u, init, dst, first, last);
      u += 4;
    }
  }
  for (; u < P; ++u) lanes_block<T, NU, 1>(off, val, nnz, src, pix + u, init, dst + (u - q) * L, first, last);
}

/// Nonzeros [jb, jb + n) of row r in tap chunk k of nk (LanesArgs::split; the whole row when
/// nk == 1), prefetching the offsets and values of row r + 2's share when that row is below r1.
template <typename T>
inline void chunk_nonzeros(const LanesArgs<T>& a, int64_t r, int64_t r1, int64_t k, int64_t nk, int32_t& jb,
                           int32_t& n) {
  if (nk <= 1) {
    jb = a.row_ptr[r];
    n = a.row_ptr[r + 1] - jb;
    return;
  }
  const int32_t* sp = a.split + r * (nk + 1);
  jb = sp[k];
  n = sp[k + 1] - jb;
  if (r + 2 < r1) {
    const int32_t jn = sp[2 * (nk + 1) + k];
    __builtin_prefetch(a.off + jn);
    __builtin_prefetch(a.off + jn + 16);
    __builtin_prefetch(a.val + jn);
  }
}

/// f(r, jb, n, src, init, first, last) for every tap chunk k < nk (outer) and row r in [r0, r1)
/// (inner): the row's nonzeros [jb, jb + n) of the chunk (chunk_nonzeros), its input (its group's
/// channels) and bias; first / last: k is the first / last chunk.
template <typename T, typename F>
inline void each_chunk_row(const LanesArgs<T>& a, int64_t r0, int64_t r1, int64_t nk, F&& f) {
  for (int64_t k = 0; k < nk; ++k) {
    for (int64_t r = r0; r < r1; ++r) {
      int32_t jb, n;
      chunk_nonzeros(a, r, r1, k, nk, jb, n);
      f(r, jb, n, a.src + (a.src_base ? a.src_base[r] : 0), a.init ? a.init[r] : T(0), k == 0, k == nk - 1);
    }
  }
}

/// One tile of 3 rows x 4 pixels (LanesArgs::tile_rows) of one output channel, one unit of lanes:
/// segment i holds 4 consecutive output pixels whose windows start at src + seg[i] and whose
/// partial sums sit at dst + out[i] * L (out[i]: the segment's first pixel index).  12 accumulator
/// vectors.
/// first / last as lanes_block.  No direct stores: measured, 4-pixel segments stored straight to
/// NCHW (16-byte stores, 4x8 transposes) made 16x16 and 8x8 maps 5-13 % slower than the 8-pixel
/// blocks, and tiles with the output transpose pass 10-12 % faster (AVX2 Zen 3, 2 threads, 90 %).
template <typename T>
inline void lanes_tile(const int32_t* off, const T* val, int32_t nnz, const T* src, const int64_t (&seg)[3],
                       const int64_t (&out)[3], T init, T* dst, bool first, bool last) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::W;
  const T* s0 = src + seg[0];
  const T* s1 = src + seg[1];
  const T* s2 = src + seg[2];
  // Opaque to the optimiser: it would otherwise fold src + seg[i] + off[j] + p * L into one index
  // per load, an extra add per FMA, instead of one base register per segment.
  asm("" : "+r"(s0), "+r"(s1), "+r"(s2));
  T* d[3] = {dst + out[0] * L, dst + out[1] * L, dst + out[2] * L};
  V a0[4], a1[4], a2[4];
  for (int p = 0; p < 4; ++p) {
    a0[p] = first ? V{} : loadu<V, T>(d[0] + p * L);
    a1[p] = first ? V{} : loadu<V, T>(d[1] + p * L);
    a2[p] = first ? V{} : loadu<V, T>(d[2] + p * L);
  }
  for (int32_t j = 0; j < nnz; ++j) {
    const V w = broadcast<V, T>(val[j]);
    const int64_t o = off[j];
    for (int p = 0; p < 4; ++p) {
      a0[p] += w * loadu<V, T>(s0 + o + p * L);
      a1[p] += w * loadu<V, T>(s1 + o + p * L);
      a2[p] += w * loadu<V, T>(s2 + o + p * L);
    }
  }
  const V b = broadcast<V, T>(last ? init : T(0));
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) {
    storeu(d[0] + p * L, a0[p] + b);
    storeu(d[1] + p * L, a1[p] + b);
    storeu(d[2] + p * L, a2[p] + b);
  }
}

/// Rows [r0, r1) over the tiled output rows [0, a.tile_rows) (one unit of lanes): every tile runs
/// every row's nonzeros, chunk by chunk with input-channel blocking (a.split), else in one pass.
template <typename T>
void lanes_rows_tiles(const LanesArgs<T>& a, int64_t r0, int64_t r1) {
  const int64_t P = a.pixels, OW = a.out_w;
  const int64_t nk = a.tap_chunk > 0 && a.tap_chunks > 1 ? a.tap_chunks : 1;
  constexpr int L = Vec<T>::W;
  for (int64_t i = 0; i < a.tile_rows; i += 3) {
    for (int64_t j = 0; j < OW; j += 4) {
      const int64_t out[3] = {i * OW + j, (i + 1) * OW + j, (i + 2) * OW + j};
      const int64_t seg[3] = {a.pix[out[0]], a.pix[out[1]], a.pix[out[2]]};
      each_chunk_row(a, r0, r1, nk, [&](int64_t r, int32_t jb, int32_t n, const T* src, T init, bool first, bool last) {
        lanes_tile<T>(a.off + jb, a.val + jb, n, src, seg, out, init, a.dst + r * P * L, first, last);
      });
    }
  }
}

/// Rows [r0, r1) with input-channel blocking (LanesArgs::tap_chunk): tap chunk 0 of every row,
/// then chunk 1, ..., each row running its blocks of PB output pixels back to back
/// (LanesArgs::blocks_inner), or block by block (every chunk and row for one block, then the next);
/// the partial sums of a row's block stay in its output block between chunks.  Split points and
/// source offsets come from the caller.  Blocks inner reuse the row's nonzeros and offsets from L1
/// for every block instead of streaming them once per block: the nonzeros of a 90 % sparse
/// 512->512 3x3 layer (1.9 MB with their offsets) outgrow the L2.  Measured (AVX2 Zen 3, 2 threads,
/// batch 32, in-process alternation, medians of 9): 512->512 on 4x4 0.79x the time at 90 % and
/// 0.83x at 95 %, stride-2 256->512 into 4x4 0.91x, 256->256 on 8x8 (its untiled rows) 0.94-0.98x,
/// larger maps 0.97-1.02x.  Tiles stay tile by tile: all tiles of a row back to back took 1.21x the
/// time on 32x32 maps, 1.18x on 16x16 and 1.04x on 8x8 (their input rows no longer in L1); one
/// tile row at a time 1.17-1.38x on 32x32 maps and 0.76-1.46x on smaller ones over three runs.
template <typename T, int NU, int PB>
void lanes_rows_chunked(const LanesArgs<T>& a, int64_t r0, int64_t r1) {
  constexpr int L = NU * Vec<T>::W;
  const int64_t P = a.pixels, nk = a.tap_chunks;
  if (a.blocks_inner) {
    // The block calls are written out in both orders on purpose: one lambda shared by the two
    // loops made this order lose its gain (512->512 on 4x4 at 95 / 90 %: 1.00 / 0.98x the time of
    // block by block instead of 0.81 / 0.73x, same process, GCC 12).
    const int64_t qb = a.tile_rows * a.out_w;
    each_chunk_row(a, r0, r1, nk, [&](int64_t r, int32_t jb, int32_t n, const T* src, T init, bool first, bool last) {
      for (int64_t q = qb; q < P; q += PB) {
        T* dst = a.dst + (r * P + q) * L;
        if (q + PB <= P) {
          lanes_block<T, NU, PB>(a.off + jb, a.val + jb, n, src, a.pix + q, init, dst, first, last, a.direct,
                                 r * P + q);
        } else {
          lanes_tail<T, NU, PB>(a.off + jb, a.val + jb, n, src, a.pix, init, dst, q, P, first, last);
        }
      }
    });
    return;
  }
  for (int64_t q = a.tile_rows * a.out_w; q < P; q += PB) {
    const bool full = q + PB <= P;
    each_chunk_row(a, r0, r1, nk, [&](int64_t r, int32_t jb, int32_t n, const T* src, T init, bool first, bool last) {
      T* dst = a.dst + (r * P + q) * L;
      if (full) {
        lanes_block<T, NU, PB>(a.off + jb, a.val + jb, n, src, a.pix + q, init, dst, first, last, a.direct,
                               r * P + q);
      } else {
        lanes_tail<T, NU, PB>(a.off + jb, a.val + jb, n, src, a.pix, init, dst, q, P, first, last);
      }
    });
  }
}

/// Rows [r0, r1) over every output pixel, NU units of lanes per pixel.
template <typename T, int NU>
void lanes_rows(const LanesArgs<T>& a, int64_t r0, int64_t r1) {
  constexpr int W = VecB<T, acc_bytes(NU)>::W;
  constexpr int N = NU * Vec<T>::W / W;
  // 8 independent accumulators hide the FMA latency; with two 32-byte vectors of images per pixel
  // (the AVX2 build), 6 pixels (12 accumulators, the tiles' count) feed each weight broadcast to 12
  // FMAs.  The wide-vector builds keep 8 / N (not measured with more).
  constexpr int PB = N == 2 && !kWide ? 6 : 8 / N > 0 ? 8 / N : 1;
  constexpr int L = NU * Vec<T>::W;
  const int64_t P = a.pixels;
  if constexpr (NU == 1) {
    if (a.tile_rows > 0) lanes_rows_tiles<T>(a, r0, r1);
  }
  if (a.tap_chunk > 0 && a.tap_chunks > 1) return lanes_rows_chunked<T, NU, PB>(a, r0, r1);
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t jb = a.row_ptr[r], nnz = a.row_ptr[r + 1] - jb;
    const T* val = a.val + jb;
    const int32_t* off = a.off + jb;
    const T* src = a.src + (a.src_base ? a.src_base[r] : 0);
    const T init = a.init ? a.init[r] : T(0);
    T* dst = a.dst + r * P * L;
    int64_t q = a.tile_rows * a.out_w;
    for (; q + PB <= P; q += PB)
      lanes_block<T, NU, PB>(off, val, nnz, src, a.pix + q, init, dst + q * L, true, true, a.direct, r * P + q);
    lanes_tail<T, NU, PB>(off, val, nnz, src, a.pix, init, dst + q * L, q, P, true, true);
  }
}

/// Channels [c0, c1) of a chunk's input: images [0, m) of f.x (image stride f.s0, ...) into
/// [C][Hp][Wp][L] with zero padding and zero lanes m .. L; pixels at f.pix -1 (read by no tap) are
/// skipped.  Contiguous float images go through 8x8 register transposes of 8 images x 8
/// consecutive pixels (groups of 8 skipped pixels not even loaded); the rest element by element.
template <typename T>
void lanes_fill_run(const LanesFill<T>& f, int64_t c0, int64_t c1) {
  // Locals: stores through T* could alias the argument struct, which would reload every field.
  const T* const x = f.x;
  const int64_t L = f.L, H = f.H, W = f.W, HW = H * W, Hp = f.Hp, Wp = f.Wp, ph = f.ph, pw = f.pw, m = f.m;
  const int64_t s0 = f.s0, s1 = f.s1, s2 = f.s2, s3 = f.s3;
  const int64_t* const at = f.pix;
  T* const dst = f.dst;
  const bool fast = sizeof(T) == 4 && s3 == 1 && s2 == W;
  const int64_t plane = f.plane > 0 ? f.plane : Hp * Wp * L;
  for (int64_t c = c0; c < c1; ++c) {
    T* P = dst + c * plane;
    // The padding (the interior is overwritten below): listed positions of stride-phase planes,
    // else the padding rows and columns of the [Hp][Wp] plane.
    if (f.pad) {
      for (int64_t k = 0; k < f.npad; ++k)
        for (int64_t l = 0; l < L; ++l) P[f.pad[k] + l] = T(0);
    } else {
      for (int64_t i = 0; i < Hp; ++i) {
        T* row = P + i * Wp * L;
        if (i < ph || i >= ph + H) {
          for (int64_t k = 0; k < Wp * L; ++k) row[k] = T(0);
        } else {
          for (int64_t k = 0; k < pw * L; ++k) row[k] = T(0);
          for (int64_t k = (pw + W) * L; k < Wp * L; ++k) row[k] = T(0);
        }
      }
    }
    int64_t n = 0;
    if constexpr (sizeof(T) == 4) {
      if (fast) {
        using V = typename Vec<float>::type;
        for (; n + 8 <= m; n += 8) {
          const T* xs = x + n * s0 + c * s1;
          int64_t q = 0;
          for (; q + 8 <= HW; q += 8) {
            int skipped = 0;
            for (int j = 0; j < 8; ++j) skipped += at[q + j] < 0;
            if (skipped == 8) continue;
            V v[8];
            for (int i = 0; i < 8; ++i) v[i] = loadu<V, T>(xs + i * s0 + q);
            transpose8(v);
            for (int j = 0; j < 8; ++j)
              if (at[q + j] >= 0) std::memcpy(P + at[q + j] + n, &v[j], sizeof(V));
          }
          for (; q < HW; ++q) {
            if (at[q] < 0) continue;
            T* d = P + at[q] + n;
            for (int i = 0; i < 8; ++i) d[i] = xs[i * s0 + q];
          }
        }
      }
    }
    if (n == L) continue;
    for (int64_t i = 0; i < H; ++i) {
      for (int64_t w = 0; w < W; ++w) {
        if (at[i * W + w] < 0) continue;
        T* d = P + at[i * W + w];
        const T* xs = x + c * s1 + i * s2 + w * s3;
        for (int64_t k = n; k < m; ++k) d[k] = xs[k * s0];
        for (int64_t k = m; k < L; ++k) d[k] = T(0);
      }
    }
  }
}

/// Output positions k in [k0, k1) (k = o * OHW + q) of images [0, m) from the chunk's output
/// [K][L] to NCHW rows (image stride s.image), adding the residual and applying the ReLU.
/// Float blocks of 8 positions x 8 images go through register transposes.
/// lanes_store_run with the 2x2 max pool (LanesStore::OW > 0): pooled positions [k0, k1).  Each
/// pooled value is the maximum of four vectors of L images (rows 2i and 2i + 1, columns 2j and
/// 2j + 1 of the chunk's output), so the unpooled map is never written to NCHW.  The ReLU comes
/// after the maximum (the same values: the ReLU is monotone and keeps NaN).
template <typename T>
void lanes_store_pooled(const LanesStore<T>& s, int64_t k0, int64_t k1) {
  const T* const src = s.src;
  T* const y = s.y;
  const int64_t L = s.L, m = s.m, image = s.image, OW = s.OW, PW = s.OW / 2, PHW = (s.OH / 2) * PW;
  const int64_t OHW = s.OH * OW;
  const bool relu = s.relu;
  if (PHW == 0 || k0 >= k1) return;
  // Source position (of the top-left pixel) of every pooled position in [k0, k1): one division
  // per call, then counters.
  const int64_t len = k1 - k0;
  std::vector<int64_t> at(static_cast<size_t>(len));
  {
    int64_t o = k0 / PHW, r = k0 - o * PHW, i = r / PW, j = r - i * PW;
    for (int64_t t = 0; t < len; ++t) {
      at[t] = o * OHW + 2 * i * OW + 2 * j;
      if (++j == PW) {
        j = 0;
        if (++i * PW == PHW) i = 0, ++o;
      }
    }
  }
  auto pooled = [&](int64_t q, int64_t n) {
    const T* p = src + q * L + n;
    T a = p[0], b = p[L], c = p[OW * L], d = p[(OW + 1) * L];
    a = (a > b || a != a) ? a : b;  // a NaN in either operand wins, as max_pool2d
    c = (c > d || c != c) ? c : d;
    a = (a > c || a != a) ? a : c;
    return (relu && a < T(0)) ? T(0) : a;  // NaN stays NaN, as torch.relu
  };
  int64_t n = 0;
  if constexpr (sizeof(T) == 4) {
    using V = typename Vec<float>::type;
    auto vmax = [](V a, V b) { return ((a > b) | (a != a)) ? a : b; };
    for (; n + 8 <= m; n += 8) {
      int64_t t = 0;
      for (; t + 8 <= len; t += 8) {
        V v[8];
        for (int u = 0; u < 8; ++u) {
          const T* p = src + at[t + u] * L + n;
          v[u] = vmax(vmax(loadu<V, T>(p), loadu<V, T>(p + L)), vmax(loadu<V, T>(p + OW * L), loadu<V, T>(p + (OW + 1) * L)));
        }
        transpose8(v);
        for (int j = 0; j < 8; ++j) {
          V o = v[j];
          if (relu) o = o < V{} ? V{} : o;
          std::memcpy(y + (n + j) * image + k0 + t, &o, sizeof(V));
        }
      }
      for (; t < len; ++t)
        for (int j = 0; j < 8; ++j) y[(n + j) * image + k0 + t] = pooled(at[t], n + j);
    }
  }
  for (; n < m; ++n)
    for (int64_t t = 0; t < len; ++t) y[n * image + k0 + t] = pooled(at[t], n);
}

template <typename T>
void lanes_store_run(const LanesStore<T>& s, int64_t k0, int64_t k1) {
  if (s.OW > 0) return lanes_store_pooled(s, k0, k1);
  const T* const src = s.src;
  const T* const res = s.res;
  const T* const rl = s.res_lanes;
  T* const y = s.y;
  const int64_t L = s.L, m = s.m, image = s.image;
  const bool relu = s.relu;
  auto finish = [&](T v, int64_t n, int64_t k) {
    if (rl) v += rl[k * L + n];
    if (res) v += res[n * image + k];
    if (relu && v < T(0)) v = T(0);  // NaN stays NaN, as torch.relu
    y[n * image + k] = v;
  };
  // Groups of 8 images outer, 16 positions inner: each image row is written as whole 64-byte
  // lines, 8 sequential streams (the image stride is often a multiple of 4 KiB, and positions
  // outer would touch 32 rows of one L1 set per step).
  int64_t n = 0;
  if constexpr (sizeof(T) == 4) {
    using V = typename Vec<float>::type;
    for (; n + 8 <= m; n += 8) {
      int64_t k = k0;
      for (; k + 8 <= k1; k += 8) {
        V v[8];
        for (int i = 0; i < 8; ++i) v[i] = loadu<V, T>(src + (k + i) * L + n);
        if (rl)
          for (int i = 0; i < 8; ++i) v[i] += loadu<V, T>(rl + (k + i) * L + n);
        transpose8(v);
        for (int j = 0; j < 8; ++j) {
          V o = v[j];
          if (res) o += loadu<V, T>(res + (n + j) * image + k);
          if (relu) o = o < V{} ? V{} : o;
          std::memcpy(y + (n + j) * image + k, &o, sizeof(V));
        }
      }
      for (; k < k1; ++k)
        for (int j = 0; j < 8; ++j) finish(src[k * L + n + j], n + j, k);
    }
  }
  for (; n < m; ++n)
    for (int64_t k = k0; k < k1; ++k) finish(src[k * L + n], n, k);
}

template <typename T>
void lanes_run(const LanesArgs<T>& a, int64_t r0, int64_t r1) {
  switch (a.units) {
    case 4: return lanes_rows<T, 4>(a, r0, r1);
    case 2: return lanes_rows<T, 2>(a, r0, r1);
    case 1: return lanes_rows<T, 1>(a, r0, r1);
    default: return;  // callers only use 1, 2 or 4 units
  }
}

}  // namespace APB_ISA_NAMESPACE
}  // namespace kernel
}  // namespace apb_sparse
