// CUDA implementations of the apb_sparse ops (schemas in csrc/ops.cpp).  Semantics and argument
// checks mirror cpu/sparse_ops.cpp; outputs are always contiguous NCHW / (*, out).
//
// Kernels (Sputnik-style, CUDA cores; float32, float64 and bfloat16 storage, accumulation in
// at::opmath_type: float for bfloat16, so a bf16 model is matched like for like with cuDNN bf16):
//  * conv forward: one block per (output-channel row, tile of output positions).  The row's
//    nonzeros are staged in shared memory in chunks (value, decoded input offset and dilated
//    kernel offsets) and each thread accumulates P output positions, with bounds checks standing
//    in for the zero padding; bias, residual and ReLU fused into the store.
//  * conv backward-to-input: a gather, no atomics, deterministic.  The nonzeros are regrouped per
//    input channel into lists of (output channel, kh*dh, kw*dw, value), and one thread per input
//    element sums the entries whose output position exists (divisible by the stride and in
//    range).  For a CSR weight the regrouping is a stable radix sort of the nonzeros by input
//    channel (O(nnz) memory, no dense temporary); for a masked weight the dense weight * mask is
//    transposed and compacted.
//  * masked ops: weight * mask is compacted per row on the GPU (one warp per row, ballot), into
//    rows of fixed capacity, so no count has to travel to the host.  The same kernels then run.
//  * linear: one warp per (output row, batch tile); lanes split the row's nonzeros and the
//    partial sums are combined with a fixed butterfly (deterministic).  The backward runs the
//    same kernel over the CSC form of the weight (the same stable sort, by column).
//
// Host synchronisation: output shapes come from metadata.  The CSR *contents* (row_ptr
// non-decreasing from 0 to nnz, col_idx in range) are validated on the device, like the CPU op
// does on the host, and the verdict (4 bytes) is read back: one sync the first time a given
// (row_ptr, col_idx) pair is seen.  Verdicts are cached per pair of storages (held weakly, so a
// freed tensor's address cannot be mistaken for a new one) and their version counters (an
// in-place write re-validates), so a deployed model's steady-state forward and backward do not
// sync.  While the current stream is capturing a CUDA graph an unseen pair is not validated
// (no sync is allowed there): warm up before capturing, as CUDA graphs require anyway.  Without
// validation a malformed CSR still cannot make a kernel touch memory out of bounds: row ranges
// are clamped to [0, nnz] and out-of-range columns are skipped, but the result is unspecified.
//
// Index arithmetic: flat tensor offsets are int64; spatial coordinates are int32, which the
// host checks allow (padded sizes < 2^30, dilated kernel extents <= 65535).
//
// Note: setup.py compiles with --use_fast_math, so float32 denormals are flushed to zero here
// (float64 is unaffected).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/max_pool2d.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <vector>

namespace apb_sparse {
namespace {

using at::Tensor;

/// The dtypes of every op: float32, float64 and bfloat16 (accumulated in float).
#define APB_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, TYPE, NAME, __VA_ARGS__)

template <typename T>
using acc_type = at::opmath_type<T>;

/// ReLU that keeps NaN, as torch.relu does (a NaN input stays NaN instead of becoming 0).
template <typename A>
__device__ __forceinline__ A relu_keep_nan(A y) {
  return y > A(0) ? y : (y != y ? y : A(0));
}

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
/// Grid caps: kernels grid-stride beyond them (gridDim.y and .z are limited to 65535).
constexpr int64_t kMaxGridX = int64_t(1) << 20;
constexpr int64_t kMaxGridY = 65535;
/// Threads of the conv forward blocks (also the shared-memory chunk of nonzeros).
constexpr int kConvThreads = 128;
/// Threads of the warp-per-row kernels (4 warps).
constexpr int kRowThreads = 128;
/// Threads of the element-wise kernels.
constexpr int kElemThreads = 256;
/// Batch rows per warp in the linear kernel.
constexpr int kLinearBatchTile = 8;
/// Sentinel coordinate: fails every bounds check; sums of two sentinels stay >= INT32_MIN.
constexpr int kInvalidCoord = -(1 << 30);

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/// Blocks for a warp-per-row launch over `rows` rows.
unsigned row_blocks(int64_t rows) {
  return unsigned(std::min(ceil_div(rows, kRowThreads / kWarp), kMaxGridX));
}

/// Blocks for a one-thread-per-element launch over `n` elements.
unsigned elem_blocks(int64_t n) { return unsigned(std::min(ceil_div(n, kElemThreads), kMaxGridX)); }

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

/// Row r of a compacted sparse matrix holds entries [beg[r], end[r]) of its value / column
/// arrays: plain CSR (beg = row_ptr, end = row_ptr + 1) or the fixed-capacity rows written by
/// pack_rows_kernel.  Ranges are clamped to [0, limit] (limit = the arrays' length), so a
/// malformed user CSR cannot make a kernel read outside the arrays.
struct RowRange {
  const int32_t* beg;
  const int32_t* end;
  int64_t limit;

  __device__ __forceinline__ void get(int64_t r, int64_t& b, int64_t& e) const {
    b = clamp64(beg[r], 0, limit);
    e = clamp64(end[r], b, limit);
  }
};

/// Convolution sizes passed to the kernels.  Spatial extents are int (checked < 2^30 on the host).
struct ConvShape {
  int64_t N, C, O, Cg, Og;
  int H, W, OH, OW, KH, KW;
  int sh, sw, ph, pw, dh, dw;
};

/// Convolution geometry and argument checks (messages as in cpu/sparse_ops.cpp), plus the
/// limits of these kernels' int32 spatial arithmetic.
struct ConvGeom {
  int64_t N, C, H, W;
  int64_t O, Cg, KH, KW, G, Og;
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t Hp, Wp, OH, OW;

  ConvGeom(at::IntArrayRef input_size, at::IntArrayRef weight_size, at::IntArrayRef stride,
           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    TORCH_CHECK(input_size.size() == 4, "input must be 4-D (N, C, H, W), got ", input_size.size(), " dims");
    TORCH_CHECK(weight_size.size() == 4, "weight_size must have 4 entries (O, C/groups, kH, kW), got ",
                weight_size.size());
    TORCH_CHECK(stride.size() == 2 && stride[0] > 0 && stride[1] > 0, "stride must be 2 positive ints, got ", stride);
    TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
                "padding must be 2 non-negative ints, got ", padding);
    TORCH_CHECK(dilation.size() == 2 && dilation[0] > 0 && dilation[1] > 0,
                "dilation must be 2 positive ints, got ", dilation);
    TORCH_CHECK(groups > 0, "groups must be positive, got ", groups);
    N = input_size[0]; C = input_size[1]; H = input_size[2]; W = input_size[3];
    O = weight_size[0]; Cg = weight_size[1]; KH = weight_size[2]; KW = weight_size[3];
    TORCH_CHECK(O >= 0 && Cg > 0 && KH > 0 && KW > 0, "weight_size must be positive, got ", weight_size);
    G = groups;
    TORCH_CHECK(C == Cg * G, "input has ", C, " channels, expected weight_size[1] * groups = ", Cg * G);
    TORCH_CHECK(O % G == 0, "weight_size[0] (", O, ") must be divisible by groups (", G, ")");
    Og = O / G;
    sh = stride[0]; sw = stride[1]; ph = padding[0]; pw = padding[1]; dh = dilation[0]; dw = dilation[1];
    // The CUDA kernels do spatial arithmetic in int32: bound every term before it is formed.
    TORCH_CHECK(H >= 0 && W >= 0 && H < (int64_t(1) << 29) && W < (int64_t(1) << 29) && ph < (int64_t(1) << 29) &&
                    pw < (int64_t(1) << 29) && sh < (int64_t(1) << 29) && sw < (int64_t(1) << 29),
                "input size ", input_size, " with padding ", padding, " and stride ", stride,
                " is too large for the CUDA kernels (each must be < 2^29)");
    TORCH_CHECK(KH <= 65536 && KW <= 65536 && dh <= 65535 && dw <= 65535 && dh * (KH - 1) <= 65535 &&
                    dw * (KW - 1) <= 65535,
                "dilated kernel extent (weight_size ", weight_size, ", dilation ", dilation,
                ") must be at most 65535 for the CUDA kernels");
    Hp = H + 2 * ph; Wp = W + 2 * pw;
    TORCH_CHECK(Hp >= dh * (KH - 1) + 1 && Wp >= dw * (KW - 1) + 1,
                "input (", H, "x", W, ") with padding ", padding, " is smaller than the dilated kernel");
    OH = (Hp - dh * (KH - 1) - 1) / sh + 1;
    OW = (Wp - dw * (KW - 1) - 1) / sw + 1;
    TORCH_CHECK(taps() < (int64_t(1) << 31), "weight_size ", weight_size, " has more than 2^31 taps per filter");
  }
  int64_t taps() const { return Cg * KH * KW; }
  ConvShape shape() const {
    return ConvShape{N,      C,      O,      Cg,      Og,      int(H),  int(W),  int(OH), int(OW),
                     int(KH), int(KW), int(sh), int(sw), int(ph), int(pw), int(dh), int(dw)};
  }
};

// ------------------------------------------------------------------------------------------------
// Kernels

/// Compacts the nonzeros of the dense rows `src[r * L + e]` (times `mask[r * L + e]` when mask is
/// not null) into the fixed-capacity rows [r * L, r * L + count) of val / col (and info), in column
/// order, and writes beg[r] = r * L, end[r] = r * L + count.  One warp per row; each 32-wide chunk
/// is compacted with a ballot (entry position = row count so far + nonzero lanes below this one),
/// so the layout is deterministic.  The host guarantees R * L < 2^31.
///
/// CONV_T = false: col = e (the tap of a conv weight row, or the column of a linear weight).
/// CONV_T = true: the rows are input channels of the transposed conv weight [C][Og][KH * KW], so
/// e = o_local * KK + kh * KW + kw; col = o_local, info = (kh * dh) << 16 | (kw * dw).
template <typename T, bool CONV_T>
__global__ void __launch_bounds__(kRowThreads)
    pack_rows_kernel(const T* __restrict__ src, const T* __restrict__ mask, int64_t R, int64_t L, int KK, int KW,
                     int dh, int dw, T* __restrict__ val, int32_t* __restrict__ col, uint32_t* __restrict__ info,
                     int32_t* __restrict__ beg, int32_t* __restrict__ end) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t warp_stride = int64_t(gridDim.x) * warps_per_block;
  // r and e0 are warp-uniform, so every lane reaches each __ballot_sync.
  for (int64_t r = int64_t(blockIdx.x) * warps_per_block + threadIdx.x / kWarp; r < R; r += warp_stride) {
    const int64_t base = r * L;
    int64_t count = 0;
    for (int64_t e0 = 0; e0 < L; e0 += kWarp) {
      const int64_t e = e0 + lane;
      T v = T(0);
      if (e < L) {
        v = src[base + e];
        if (mask != nullptr) v = T(acc_type<T>(v) * acc_type<T>(mask[base + e]));
      }
      // NaN != 0: NaN products are kept, as on the CPU.
      const bool nz = e < L && v != T(0);
      const unsigned ballot = __ballot_sync(kFullMask, nz);
      if (nz) {
        const int64_t pos = base + count + __popc(ballot & ((1u << lane) - 1u));
        val[pos] = v;
        if constexpr (CONV_T) {
          const int ol = int(e / KK);
          const int kk = int(e - int64_t(ol) * KK);
          const int kh = kk / KW, kw = kk - kh * KW;
          col[pos] = ol;
          info[pos] = (uint32_t(kh * dh) << 16) | uint32_t(kw * dw);
        } else {
          col[pos] = int32_t(e);
        }
      }
      count += __popc(ballot);
    }
    if (lane == 0) {
      beg[r] = int32_t(base);
      end[r] = int32_t(base + count);
    }
  }
}

/// Sparse convolution forward.  Block (tile, row): output channel o = blockIdx.y (grid-stride)
/// and the P * blockDim.x output positions p = tile * P * blockDim.x + k * blockDim.x + tid
/// (k < P) of the flattened (n, oh, ow) space, so a warp covers consecutive ow (coalesced).
///
/// Row o's nonzeros are staged blockDim.x at a time in shared memory as (value, offset of the tap
/// relative to the window origin, kh * dh, kw * dw); tap t = (c_local * KH + kh) * KW + kw reads
/// input channel c = (o / Og) * Cg + c_local at (oh * sh - ph + kh * dh, ow * sw - pw + kw * dw),
/// and the unsigned compare against H / W rejects the padding and invalid taps / positions (whose
/// coordinates are kInvalidCoord).  The store adds the bias and the residual (same layout as
/// out, may be null) and applies the ReLU (NaN kept) in the accumulator type, then rounds once.
template <typename T, int P>
__global__ void __launch_bounds__(kConvThreads)
    conv_forward_kernel(ConvShape s, RowRange rows, const int32_t* __restrict__ col, const T* __restrict__ val,
                        const T* __restrict__ x, const T* __restrict__ bias, const T* __restrict__ res, bool relu,
                        T* __restrict__ out) {
  using A = acc_type<T>;
  __shared__ A s_val[kConvThreads];
  __shared__ int64_t s_off[kConvThreads];
  __shared__ int s_dh[kConvThreads];
  __shared__ int s_dw[kConvThreads];

  const int tid = threadIdx.x;
  const int bs = blockDim.x;
  const int64_t OHW = int64_t(s.OH) * s.OW;
  const int64_t HW = int64_t(s.H) * s.W;
  const int64_t CHW = s.C * HW;
  const int64_t NP = s.N * OHW;
  const int KK = s.KH * s.KW;
  const int64_t taps = s.Cg * KK;
  const int64_t tile_len = int64_t(P) * bs;
  const int64_t ntiles = (NP + tile_len - 1) / tile_len;

  // All loop bounds below are block-uniform, so every thread reaches each __syncthreads().
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    int ih0[P], iw0[P];   // window origin (top-left tap at kh = kw = 0), may be negative
    int64_t xb[P];        // flat input offset of the window origin in channel 0 of image n
    int64_t ob[P];        // flat output offset of (n, o = 0, oh, ow), -1 when past the end
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t p = tile * tile_len + int64_t(k) * bs + tid;
      if (p < NP) {
        const int64_t n = p / OHW;
        const int64_t sp = p - n * OHW;
        const int oh = int(sp / s.OW);
        const int ow = int(sp - int64_t(oh) * s.OW);
        ih0[k] = oh * s.sh - s.ph;
        iw0[k] = ow * s.sw - s.pw;
        xb[k] = n * CHW + int64_t(ih0[k]) * s.W + iw0[k];
        ob[k] = n * s.O * OHW + sp;
      } else {
        ih0[k] = kInvalidCoord;
        iw0[k] = kInvalidCoord;
        xb[k] = 0;
        ob[k] = -1;
      }
    }
    for (int64_t o = blockIdx.y; o < s.O; o += gridDim.y) {
      int64_t b, e;
      rows.get(o, b, e);
      const int64_t cbase = (o / s.Og) * s.Cg;
      A acc[P];
#pragma unroll
      for (int k = 0; k < P; ++k) acc[k] = A(0);
      for (int64_t j0 = b; j0 < e; j0 += bs) {
        const int cnt = int(e - j0 < bs ? e - j0 : bs);
        __syncthreads();  // the previous chunk (of this or an earlier row / tile) is consumed
        if (tid < cnt) {
          const int64_t j = j0 + tid;
          const int32_t t = col[j];
          if (t >= 0 && t < taps) {
            const int cl = t / KK;
            const int kk = t - cl * KK;
            const int kh = kk / s.KW;
            const int kw = kk - kh * s.KW;
            const int dkh = kh * s.dh, dkw = kw * s.dw;
            s_val[tid] = A(val[j]);
            s_off[tid] = (cbase + cl) * HW + int64_t(dkh) * s.W + dkw;
            s_dh[tid] = dkh;
            s_dw[tid] = dkw;
          } else {  // malformed column: skipped
            s_val[tid] = A(0);
            s_off[tid] = 0;
            s_dh[tid] = kInvalidCoord;
            s_dw[tid] = kInvalidCoord;
          }
        }
        __syncthreads();
        for (int i = 0; i < cnt; ++i) {
          const A v = s_val[i];
          const int64_t off = s_off[i];
          const int dkh = s_dh[i], dkw = s_dw[i];
#pragma unroll
          for (int k = 0; k < P; ++k) {
            // Negative coordinates wrap to >= 2^31 > H, W: one compare per axis.
            if (unsigned(ih0[k] + dkh) < unsigned(s.H) && unsigned(iw0[k] + dkw) < unsigned(s.W))
              acc[k] += v * A(x[xb[k] + off]);
          }
        }
      }
      const A bv = bias != nullptr ? A(bias[o]) : A(0);
      const int64_t obase = o * OHW;
#pragma unroll
      for (int k = 0; k < P; ++k) {
        if (ob[k] < 0) continue;
        A y = acc[k] + bv;
        if (res != nullptr) y += A(res[ob[k] + obase]);
        if (relu) y = relu_keep_nan(y);
        out[ob[k] + obase] = T(y);
      }
    }
  }
}

/// Transposed dense weight from a dense one (times the mask when not null), one thread per
/// element: wt[((g * Cg + cl) * Og + ol) * KK + kk] = w[((g * Og + ol) * Cg + cl) * KK + kk],
/// i.e. row c = g * Cg + cl of wt lists the taps of input channel c over its group's filters.
template <typename T>
__global__ void __launch_bounds__(kElemThreads)
    transpose_weight_kernel(const T* __restrict__ w, const T* __restrict__ mask, int64_t G, int64_t Og, int64_t Cg,
                            int64_t KK, T* __restrict__ wt) {
  const int64_t total = G * Og * Cg * KK;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t kk = i % KK;
    int64_t r = i / KK;
    const int64_t ol = r % Og;
    r /= Og;
    const int64_t cl = r % Cg;
    const int64_t g = r / Cg;
    const int64_t src = ((g * Og + ol) * Cg + cl) * KK + kk;
    wt[i] = mask != nullptr ? T(acc_type<T>(w[src]) * acc_type<T>(mask[src])) : w[src];
  }
}

/// Convolution backward-to-input as a gather: one thread per input element (n, c, ih, iw),
/// summing value * grad_out[n, o, oh, ow] over input channel c's entries (o_local, kh * dh,
/// kw * dw) from pack_rows_kernel<CONV_T = true> or transpose_csr.  The entry touches the element when
/// ih = oh * sh - ph + kh * dh, i.e. th = ih + ph - kh * dh is a non-negative multiple of sh with
/// th / sh < OH (same for w).  Fixed summation order, no atomics.
template <typename T, bool UNIT_STRIDE>
__global__ void __launch_bounds__(kElemThreads)
    conv_backward_input_kernel(ConvShape s, RowRange rows, const int32_t* __restrict__ ocol,
                               const uint32_t* __restrict__ info, const T* __restrict__ val,
                               const T* __restrict__ go, T* __restrict__ gin) {
  using A = acc_type<T>;
  const int64_t HW = int64_t(s.H) * s.W;
  const int64_t OHW = int64_t(s.OH) * s.OW;
  const int64_t total = s.N * s.C * HW;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int iw = int(i % s.W);
    int64_t r = i / s.W;
    const int ih = int(r % s.H);
    r /= s.H;
    const int64_t c = r % s.C;
    const int64_t n = r / s.C;
    int64_t b, e;
    rows.get(c, b, e);
    const int64_t obase = (c / s.Cg) * s.Og;
    const T* gon = go + n * s.O * OHW;
    const int th0 = ih + s.ph, tw0 = iw + s.pw;
    A acc = A(0);
    for (int64_t j = b; j < e; ++j) {
      const uint32_t d = info[j];
      int oh = th0 - int(d >> 16);
      int ow = tw0 - int(d & 0xffffu);
      if constexpr (!UNIT_STRIDE) {
        if (oh < 0 || ow < 0) continue;
        const int qh = oh / s.sh, qw = ow / s.sw;
        if (qh * s.sh != oh || qw * s.sw != ow) continue;
        oh = qh;
        ow = qw;
      }
      if (unsigned(oh) >= unsigned(s.OH) || unsigned(ow) >= unsigned(s.OW)) continue;
      acc += A(val[j]) * A(gon[((obase + ocol[j]) * s.OH + oh) * s.OW + ow]);
    }
    gin[i] = T(acc);
  }
}

/// out[b, r] = init[r] + sum_j val[j] * x[b, col[j]] over row r's entries; x is (B, K) row-major,
/// out (B, R) row-major, init may be null.  One warp per (row r, tile of kLinearBatchTile batch
/// rows): lanes take every 32nd entry, then a xor-butterfly reduction (identical result on every
/// lane, fixed order) and lane t stores batch row b0 + t.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    linear_rows_kernel(RowRange rows, int64_t R, const int32_t* __restrict__ col, const T* __restrict__ val,
                       const T* __restrict__ x, int64_t B, int64_t K, const T* __restrict__ init,
                       T* __restrict__ out) {
  using A = acc_type<T>;
  constexpr int BT = kLinearBatchTile;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t warp_stride = int64_t(gridDim.x) * warps_per_block;
  // r and b0 are warp-uniform, so every lane reaches each __shfl_xor_sync.
  for (int64_t r = int64_t(blockIdx.x) * warps_per_block + threadIdx.x / kWarp; r < R; r += warp_stride) {
    int64_t b, e;
    rows.get(r, b, e);
    const A bv = init != nullptr ? A(init[r]) : A(0);
    for (int64_t b0 = int64_t(blockIdx.y) * BT; b0 < B; b0 += int64_t(gridDim.y) * BT) {
      const int nb = int(B - b0 < BT ? B - b0 : BT);
      A acc[BT];
#pragma unroll
      for (int t = 0; t < BT; ++t) acc[t] = A(0);
      for (int64_t j = b + lane; j < e; j += kWarp) {
        const int64_t c = col[j];
        if (c < 0 || c >= K) continue;  // malformed column: skipped
        const A v = A(val[j]);
        const T* xc = x + b0 * K + c;
#pragma unroll
        for (int t = 0; t < BT; ++t)
          if (t < nb) acc[t] += v * A(xc[int64_t(t) * K]);
      }
#pragma unroll
      for (int t = 0; t < BT; ++t) {
#pragma unroll
        for (int m = kWarp / 2; m > 0; m /= 2) acc[t] += __shfl_xor_sync(kFullMask, acc[t], m);
      }
#pragma unroll
      for (int t = 0; t < BT; ++t)
        if (lane == t && t < nb) out[(b0 + t) * R + r] = T(acc[t] + bv);
    }
  }
}

/// First step of transpose_csr: entry j gets the sentinel key K, row 0 and perm[j] = j, so
/// entries outside every row range (malformed CSR) sort last and are never read.
__global__ void __launch_bounds__(kElemThreads)
    init_keys_kernel(int64_t nnz, int32_t K, int32_t* __restrict__ key, int32_t* __restrict__ row_of,
                     int32_t* __restrict__ perm) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < nnz; j += int64_t(gridDim.x) * blockDim.x) {
    key[j] = K;
    row_of[j] = 0;
    perm[j] = int32_t(j);
  }
}

/// Second step of transpose_csr, one warp per CSR row r: entry j of the row gets row_of[j] = r
/// and the key of the row it moves to, its column (linear: key = col) or, for a conv weight
/// (KK = kH * kW > 0), its input channel (r / Og) * Cg + col / KK.  Out-of-range columns keep the
/// sentinel key K.
__global__ void __launch_bounds__(kRowThreads)
    csr_keys_kernel(RowRange rows, int64_t R, const int32_t* __restrict__ col, int64_t cols, int64_t Og,
                    int64_t Cg, int KK, int32_t* __restrict__ key, int32_t* __restrict__ row_of) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t warp_stride = int64_t(gridDim.x) * warps_per_block;
  for (int64_t r = int64_t(blockIdx.x) * warps_per_block + threadIdx.x / kWarp; r < R; r += warp_stride) {
    int64_t b, e;
    rows.get(r, b, e);
    for (int64_t j = b + lane; j < e; j += kWarp) {
      const int64_t t = col[j];
      if (t < 0 || t >= cols) continue;  // malformed column: stays on the sentinel key
      key[j] = int32_t(KK > 0 ? (r / Og) * Cg + t / KK : t);
      row_of[j] = int32_t(r);
    }
  }
}

/// ptr[c] = the first position i of the sorted keys with key[i] >= c, for c = 0 .. K + 1 (so
/// row c of the transposed matrix is [ptr[c], ptr[c + 1])).  Thread i (0 <= i <= nnz) writes the
/// c in (key[i - 1], key[i]], with key[-1] = -1 and key[nnz] = K + 1: every c exactly once, no
/// atomics and no scan.
__global__ void __launch_bounds__(kElemThreads)
    key_bounds_kernel(const int32_t* __restrict__ key, int64_t nnz, int32_t K, int32_t* __restrict__ ptr) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i <= nnz; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t lo = i == 0 ? 0 : int64_t(key[i - 1]) + 1;
    const int64_t hi = i == nnz ? int64_t(K) + 1 : int64_t(key[i]);
    for (int64_t c = lo; c <= hi; ++c) ptr[c] = int32_t(i);
  }
}

/// Last step of transpose_csr: entry i of the transposed matrix is CSR entry j = perm[i].
/// Linear (KK = 0): column = its CSR row.  Conv (KK > 0): column = its output channel within
/// the group, info = (kh * dh) << 16 | (kw * dw), as pack_rows_kernel<CONV_T = true> writes.
template <typename T>
__global__ void __launch_bounds__(kElemThreads)
    gather_transposed_kernel(const int32_t* __restrict__ perm, int64_t nnz, const int32_t* __restrict__ row_of,
                             const int32_t* __restrict__ col, const T* __restrict__ val, int64_t cols, int64_t Og,
                             int KK, int KW, int dh, int dw, T* __restrict__ val_t, int32_t* __restrict__ col_t,
                             uint32_t* __restrict__ info) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nnz; i += int64_t(gridDim.x) * blockDim.x) {
    const int32_t j = perm[i];
    const int64_t r = row_of[j];
    val_t[i] = val[j];
    if (KK > 0) {
      const int64_t t = col[j];
      const int kk = (t >= 0 && t < cols) ? int(t % KK) : 0;  // sentinel entries: never read
      const int kh = kk / KW, kw = kk - kh * KW;
      col_t[i] = int32_t(r % Og);
      info[i] = (uint32_t(kh * dh) << 16) | uint32_t(kw * dw);
    } else {
      col_t[i] = int32_t(r);
    }
  }
}

/// CSR contents check: flags |= 1 when row_ptr[0] != 0 or row_ptr[R] != nnz, 2 when row_ptr
/// decreases somewhere, 4 when a column is outside [0, cols).
__global__ void __launch_bounds__(kElemThreads)
    validate_csr_kernel(const int32_t* __restrict__ rp, int64_t R, const int32_t* __restrict__ col, int64_t nnz,
                        int64_t cols, int32_t* __restrict__ flags) {
  const int64_t n = R + 1 > nnz ? R + 1 : nnz;
  int32_t bad = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (i <= R) {
      if ((i == 0 && rp[0] != 0) || (i == R && rp[R] != nnz)) bad |= 1;
      if (i < R && rp[i] > rp[i + 1]) bad |= 2;
    }
    if (i < nnz && (col[i] < 0 || col[i] >= cols)) bad |= 4;
  }
  if (bad != 0) atomicOr(flags, bad);
}

// ------------------------------------------------------------------------------------------------
// Host side

/// Compacted rows produced on the GPU: values, columns, optional conv info, and the row ranges:
/// [beg | end] of R fixed-capacity rows of length L (pack_rows) or a row pointer of R + 1 entries
/// (transpose_csr, row_pointer = true).
struct PackedRows {
  Tensor val, col, info, ranges;
  int64_t R = 0, L = 0;
  bool row_pointer = false;
  RowRange rows() const {
    const int32_t* p = ranges.const_data_ptr<int32_t>();
    if (row_pointer) return RowRange{p, p + 1, val.numel()};
    return RowRange{p, p + R, R * L};
  }
};

/// Compacts the R dense rows of length L at `src` (times `mask`) on the current stream.
/// conv_t: see pack_rows_kernel (g gives KH, KW, dilation).
template <typename T>
PackedRows pack_rows(const T* src, const T* mask, int64_t R, int64_t L, const at::TensorOptions& opts, bool conv_t,
                     const ConvGeom* g, cudaStream_t stream) {
  TORCH_CHECK(R * L < (int64_t(1) << 31), "weight has ", R * L,
              " entries; the CUDA kernels index it with int32 (at most 2^31 - 1)");
  PackedRows p;
  p.R = R;
  p.L = L;
  const auto iopts = opts.dtype(at::kInt);
  p.val = at::empty({R * L}, opts);
  p.col = at::empty({R * L}, iopts);
  p.ranges = at::empty({2 * R}, iopts);
  if (conv_t) p.info = at::empty({R * L}, iopts);
  if (R == 0) return p;
  int32_t* ranges = p.ranges.mutable_data_ptr<int32_t>();
  if (conv_t) {
    pack_rows_kernel<T, true><<<row_blocks(R), kRowThreads, 0, stream>>>(
        src, mask, R, L, int(g->KH * g->KW), int(g->KW), int(g->dh), int(g->dw), p.val.mutable_data_ptr<T>(),
        p.col.mutable_data_ptr<int32_t>(), reinterpret_cast<uint32_t*>(p.info.mutable_data_ptr<int32_t>()), ranges,
        ranges + R);
  } else {
    pack_rows_kernel<T, false><<<row_blocks(R), kRowThreads, 0, stream>>>(
        src, mask, R, L, 1, 1, 1, 1, p.val.mutable_data_ptr<T>(), p.col.mutable_data_ptr<int32_t>(), nullptr,
        ranges, ranges + R);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p;
}

/// The CSR weight (R rows, columns in [0, cols)) regrouped into K rows on the device, without a
/// host sync or a dense temporary: linear (conv = nullptr): the CSC form, K = cols, column = the
/// CSR row; conv: per input channel, K = C, column = output channel within the group, with the
/// (kh * dh, kw * dw) info that conv_backward_input_kernel reads.  A stable radix sort of the
/// entries by key keeps, within each new row, the CSR order (output channel, then tap), which is
/// also the order the dense transposition produced, so the summation order is fixed.  Memory
/// O(nnz + K).
template <typename T>
PackedRows transpose_csr(const RowRange& rows, int64_t R, const int32_t* col, const T* val, int64_t nnz,
                         int64_t cols, int64_t K, const ConvGeom* conv, const at::TensorOptions& opts,
                         cudaStream_t stream) {
  TORCH_INTERNAL_ASSERT(K + 1 < (int64_t(1) << 31) && nnz < (int64_t(1) << 31));
  const auto iopts = opts.dtype(at::kInt);
  PackedRows p;
  p.R = K;
  p.row_pointer = true;
  p.val = at::empty({nnz}, opts);
  p.col = at::empty({nnz}, iopts);
  if (conv != nullptr) p.info = at::empty({nnz}, iopts);
  p.ranges = at::empty({K + 2}, iopts);
  Tensor keys = at::empty({2 * nnz}, iopts), perm = at::empty({2 * nnz}, iopts), row_of = at::empty({nnz}, iopts);
  int32_t* key_in = keys.mutable_data_ptr<int32_t>();
  int32_t* key_out = key_in + nnz;
  int32_t* perm_in = perm.mutable_data_ptr<int32_t>();
  int32_t* perm_out = perm_in + nnz;
  int32_t* rowp = row_of.mutable_data_ptr<int32_t>();
  const int KK = conv != nullptr ? int(conv->KH * conv->KW) : 0;
  if (nnz > 0) {
    init_keys_kernel<<<elem_blocks(nnz), kElemThreads, 0, stream>>>(nnz, int32_t(K), key_in, rowp, perm_in);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (R > 0) {
      csr_keys_kernel<<<row_blocks(R), kRowThreads, 0, stream>>>(rows, R, col, cols, conv ? conv->Og : 1,
                                                                  conv ? conv->Cg : 1, KK, key_in, rowp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    int end_bit = 1;
    while ((int64_t(1) << end_bit) <= K) ++end_bit;  // keys are 0 .. K
    size_t temp_bytes = 0;
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, key_in, key_out, perm_in, perm_out, int(nnz),
                                                   0, end_bit, stream));
    Tensor temp = at::empty({int64_t(temp_bytes)}, opts.dtype(at::kByte));
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.mutable_data_ptr(), temp_bytes, key_in, key_out, perm_in,
                                                   perm_out, int(nnz), 0, end_bit, stream));
    gather_transposed_kernel<T><<<elem_blocks(nnz), kElemThreads, 0, stream>>>(
        perm_out, nnz, rowp, col, val, cols, conv ? conv->Og : 1, KK, conv ? int(conv->KW) : 1,
        conv ? int(conv->dh) : 1, conv ? int(conv->dw) : 1, p.val.mutable_data_ptr<T>(),
        p.col.mutable_data_ptr<int32_t>(),
        conv != nullptr ? reinterpret_cast<uint32_t*>(p.info.mutable_data_ptr<int32_t>()) : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  key_bounds_kernel<<<elem_blocks(nnz + 1), kElemThreads, 0, stream>>>(key_out, nnz, int32_t(K),
                                                                        p.ranges.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p;
}

/// Launches the conv forward into `out` (contiguous, non-empty).  Large position counts use
/// 128-thread blocks with 4 positions per thread; small maps (batch 1, late layers) use one
/// position per thread and as few warps as cover them, so fewer threads idle.
template <typename T>
void launch_conv_forward(const ConvGeom& g, const RowRange& rows, const int32_t* col, const T* val, const T* x,
                         const T* bias, const T* res, bool relu, T* out, cudaStream_t stream) {
  const int64_t NP = g.N * g.OH * g.OW;
  const ConvShape s = g.shape();
  const unsigned grid_y = unsigned(std::min(g.O, kMaxGridY));
  if (NP >= 4 * kConvThreads) {
    const unsigned grid_x = unsigned(std::min(ceil_div(NP, 4 * kConvThreads), kMaxGridX));
    conv_forward_kernel<T, 4>
        <<<dim3(grid_x, grid_y), kConvThreads, 0, stream>>>(s, rows, col, val, x, bias, res, relu, out);
  } else {
    const int threads = int(std::min<int64_t>(kConvThreads, ceil_div(NP, kWarp) * kWarp));
    const unsigned grid_x = unsigned(ceil_div(NP, threads));
    conv_forward_kernel<T, 1><<<dim3(grid_x, grid_y), threads, 0, stream>>>(s, rows, col, val, x, bias, res, relu,
                                                                             out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

/// grad_input from per-input-channel entry lists (pack_rows<conv_t> or transpose_csr): the gather.
template <typename T>
void launch_conv_backward_input(const ConvGeom& g, const PackedRows& p, const Tensor& grad_output, Tensor& gin,
                                cudaStream_t stream) {
  const int64_t total = gin.numel();
  const ConvShape s = g.shape();
  const RowRange rows = p.rows();
  const int32_t* ocol = p.col.const_data_ptr<int32_t>();
  const uint32_t* info = reinterpret_cast<const uint32_t*>(p.info.const_data_ptr<int32_t>());
  const T* val = p.val.const_data_ptr<T>();
  const T* go = grad_output.const_data_ptr<T>();
  T* out = gin.mutable_data_ptr<T>();
  if (g.sh == 1 && g.sw == 1) {
    conv_backward_input_kernel<T, true><<<elem_blocks(total), kElemThreads, 0, stream>>>(s, rows, ocol, info, val,
                                                                                         go, out);
  } else {
    conv_backward_input_kernel<T, false><<<elem_blocks(total), kElemThreads, 0, stream>>>(s, rows, ocol, info, val,
                                                                                          go, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

/// Launches linear_rows_kernel (out non-empty).
template <typename T>
void launch_linear_rows(const RowRange& rows, int64_t R, const int32_t* col, const T* val, const T* x, int64_t B,
                        int64_t K, const T* init, T* out, cudaStream_t stream) {
  const dim3 grid(row_blocks(R), unsigned(std::min(ceil_div(B, kLinearBatchTile), kMaxGridY)));
  linear_rows_kernel<T><<<grid, kRowThreads, 0, stream>>>(rows, R, col, val, x, B, K, init, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// -- argument checks (messages as in cpu/sparse_ops.cpp) ------------------------------------------

bool supported_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kDouble || t == at::kBFloat16; }

void check_conv_input(const Tensor& input, const char* name) {
  TORCH_CHECK(input.dim() == 4, name, " must be 4-D (N, C, H, W), got ", input.dim(), " dims");
  TORCH_CHECK(supported_dtype(input.scalar_type()), name, " must be float32, float64 or bfloat16 (CUDA), got ",
              input.scalar_type());
  TORCH_CHECK(input.is_cuda(), name, " must be a CUDA tensor, got one on ", input.device());
}

/// One CSR whose contents were validated: its two index tensors' storages (held weakly: while an
/// entry exists its StorageImpl cannot be freed and reused at the same address), their offsets,
/// sizes and version counters, and the column bound.
struct ValidatedCsr {
  c10::weak_intrusive_ptr<c10::StorageImpl> rp, ci;
  int64_t rp_off, ci_off, rp_ver, ci_ver, rows, nnz, cols;
};

/// Whether t's contents can be identified by (storage, offset, version): inference tensors have
/// no version counter, so they are validated on every call.
bool trackable(const Tensor& t) { return !t.is_inference() && t.has_storage(); }

bool same_csr(const ValidatedCsr& v, const Tensor& rp, const Tensor& ci, int64_t rows, int64_t cols) {
  return !v.rp.expired() && !v.ci.expired() && v.rp._unsafe_get_target() == rp.storage().unsafeGetStorageImpl() &&
         v.ci._unsafe_get_target() == ci.storage().unsafeGetStorageImpl() && v.rp_off == rp.storage_offset() &&
         v.ci_off == ci.storage_offset() && v.rp_ver == rp._version() && v.ci_ver == ci._version() &&
         v.rows == rows && v.nnz == ci.numel() && v.cols == cols;
}

/// The validated-CSR cache (see the file comment), most recent last; bounded, oldest dropped.
class CsrCache {
 public:
  bool contains(const Tensor& rp, const Tensor& ci, int64_t rows, int64_t cols) {
    if (!trackable(rp) || !trackable(ci)) return false;
    const std::lock_guard<std::mutex> lock(mu_);
    for (const auto& v : entries_)
      if (same_csr(v, rp, ci, rows, cols)) return true;
    return false;
  }
  void insert(const Tensor& rp, const Tensor& ci, int64_t rows, int64_t cols) {
    if (!trackable(rp) || !trackable(ci)) return;
    const std::lock_guard<std::mutex> lock(mu_);
    // Drop expired entries, then the oldest beyond the bound.
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                  [](const ValidatedCsr& v) { return v.rp.expired() || v.ci.expired(); }),
                   entries_.end());
    while (entries_.size() >= kCapacity) entries_.pop_front();
    entries_.push_back(ValidatedCsr{rp.storage().getWeakStorageImpl(), ci.storage().getWeakStorageImpl(),
                                    rp.storage_offset(), ci.storage_offset(), rp._version(), ci._version(), rows,
                                    ci.numel(), cols});
  }

 private:
  /// A ResNet-18 has 21 sparse layers; a few models side by side fit.
  static constexpr size_t kCapacity = 512;
  std::mutex mu_;
  std::deque<ValidatedCsr> entries_;
};

CsrCache& csr_cache() {
  static CsrCache* cache = new CsrCache();  // leaked on purpose: no destruction-order issues at exit
  return *cache;
}

/// Validates the CSR contents on the device (messages as in cpu/sparse_ops.cpp), unless this
/// (row_ptr, col_idx) pair is in the cache or the current stream is capturing a CUDA graph.
/// rp and ci are the contiguous index tensors on the current device.
void check_csr_contents(const Tensor& rp, const Tensor& ci, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (csr_cache().contains(rp, ci, rows, cols)) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;  // no sync allowed; kernels stay in bounds
  const int64_t nnz = ci.numel();
  Tensor flags = at::zeros({1}, rp.options());
  validate_csr_kernel<<<elem_blocks(std::max(rows + 1, nnz)), kElemThreads, 0, stream>>>(
      rp.const_data_ptr<int32_t>(), rows, ci.const_data_ptr<int32_t>(), nnz, cols, flags.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  int32_t bad = 0;
  c10::cuda::memcpy_and_sync(&bad, flags.const_data_ptr<int32_t>(), sizeof(bad), cudaMemcpyDeviceToHost, stream);
  TORCH_CHECK(!(bad & 1), "row_ptr must start at 0 and end at nnz = ", nnz);
  TORCH_CHECK(!(bad & 2), "row_ptr must be non-decreasing");
  if (bad & 4) {  // error path only: find the first bad entry on the host for the message
    std::vector<int32_t> c(static_cast<size_t>(nnz));
    c10::cuda::memcpy_and_sync(c.data(), ci.const_data_ptr<int32_t>(), nnz * int64_t(sizeof(int32_t)),
                               cudaMemcpyDeviceToHost, stream);
    int64_t j = 0;
    while (j < nnz && c[j] >= 0 && c[j] < cols) ++j;
    TORCH_CHECK(false, "col_idx entry ", j < nnz ? c[j] : -1, " at position ", j, " out of range [0, ", cols, ")");
  }
  csr_cache().insert(rp, ci, rows, cols);
}

/// Metadata checks of a CSR weight (the contents are checked by check_csr_contents once the
/// device guard is set).
void check_csr(const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx, int64_t rows,
               const Tensor& input) {
  TORCH_CHECK(values.dim() == 1, "values must be 1-D, got ", values.dim(), " dims");
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.scalar_type() == at::kInt,
              "row_ptr must be a 1-D int32 tensor, got ", row_ptr.scalar_type(), " with ", row_ptr.dim(), " dims");
  TORCH_CHECK(col_idx.dim() == 1 && col_idx.scalar_type() == at::kInt,
              "col_idx must be a 1-D int32 tensor, got ", col_idx.scalar_type(), " with ", col_idx.dim(), " dims");
  TORCH_CHECK(values.scalar_type() == input.scalar_type(), "values dtype ", values.scalar_type(),
              " does not match the input dtype ", input.scalar_type());
  TORCH_CHECK(values.device() == input.device() && row_ptr.device() == input.device() &&
                  col_idx.device() == input.device(),
              "values, row_ptr and col_idx must be on the input's device ", input.device());
  TORCH_CHECK(row_ptr.numel() == rows + 1, "row_ptr has ", row_ptr.numel(), " entries, expected ", rows + 1);
  TORCH_CHECK(col_idx.numel() == values.numel(), "col_idx has ", col_idx.numel(), " entries but values has ",
              values.numel());
  TORCH_CHECK(values.numel() < (int64_t(1) << 31), "values has more than 2^31 - 1 entries");
}

void check_bias(const std::optional<Tensor>& bias, const Tensor& input, int64_t O) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->numel() == O, "bias must have shape (", O, "), got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == input.scalar_type(), "bias dtype ", bias->scalar_type(),
              " does not match the input dtype ", input.scalar_type());
  TORCH_CHECK(bias->device() == input.device(), "bias must be on the input's device ", input.device());
}

void check_weight_mask(const Tensor& weight, const Tensor& mask, const Tensor& input) {
  TORCH_CHECK(weight.dim() == 4, "weight must be 4-D (O, C/groups, kH, kW), got ", weight.dim(), " dims");
  TORCH_CHECK(mask.sizes() == weight.sizes(), "mask has shape ", mask.sizes(), ", expected the weight's shape ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "weight dtype ", weight.scalar_type(),
              " does not match the input dtype ", input.scalar_type());
  TORCH_CHECK(mask.scalar_type() == input.scalar_type(), "mask dtype ", mask.scalar_type(),
              " does not match the input dtype ", input.scalar_type());
  TORCH_CHECK(weight.device() == input.device() && mask.device() == input.device(),
              "weight and mask must be on the input's device ", input.device());
}

void check_grad_output(const Tensor& grad_output, const ConvGeom& g) {
  TORCH_CHECK(grad_output.size(0) == g.N && grad_output.size(1) == g.O && grad_output.size(2) == g.OH &&
                  grad_output.size(3) == g.OW,
              "grad_output has shape ", grad_output.sizes(), ", expected (", g.N, ", ", g.O, ", ", g.OH, ", ", g.OW,
              ")");
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

int64_t leading_numel(at::IntArrayRef sizes) {
  int64_t n = 1;
  for (size_t i = 0; i + 1 < sizes.size(); ++i) n *= sizes[i];
  return n;
}

// -- ops ---------------------------------------------------------------------------------------

Tensor sparse_conv2d_cuda(const Tensor& input, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                          at::IntArrayRef weight_size, const std::optional<Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          const std::optional<Tensor>& residual, bool relu, bool max_pool) {
  check_conv_input(input, "input");
  const ConvGeom g(input.sizes(), weight_size, stride, padding, dilation, groups);
  check_csr(values, row_ptr, col_idx, g.O, input);
  check_bias(bias, input, g.O);
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 4 && residual->size(0) == g.N && residual->size(1) == g.O &&
                    residual->size(2) == g.OH && residual->size(3) == g.OW,
                "residual has shape ", residual->sizes(), ", expected the output shape (", g.N, ", ", g.O, ", ",
                g.OH, ", ", g.OW, ")");
    TORCH_CHECK(residual->scalar_type() == input.scalar_type(), "residual dtype ", residual->scalar_type(),
                " does not match the input dtype ", input.scalar_type());
    TORCH_CHECK(residual->device() == input.device(), "residual must be on the input's device ", input.device());
  }
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  check_csr_contents(rp, ci, g.O, g.taps(), stream);
  // max_pool: nn.MaxPool2d(2, 2) after the epilogue (ATen's kernel; floor mode, so a map under
  // 2 x 2 pools to an empty one, as the CPU op).
  if (max_pool && (g.OH < 2 || g.OW < 2)) return at::empty({g.N, g.O, g.OH / 2, g.OW / 2}, input.options());
  Tensor out = at::empty({g.N, g.O, g.OH, g.OW}, input.options());
  if (out.numel() == 0) return max_pool ? at::empty({g.N, g.O, g.OH / 2, g.OW / 2}, input.options()) : out;
  const Tensor x = input.contiguous(), v = values.contiguous();
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  // The residual is read in the output's layout (contiguous NCHW).
  const Tensor r = residual.has_value() ? residual->contiguous() : Tensor();
  const int32_t* rpp = rp.const_data_ptr<int32_t>();
  const RowRange rows{rpp, rpp + 1, v.numel()};
  APB_DISPATCH(input.scalar_type(), "sparse_conv2d_cuda", [&] {
    launch_conv_forward<scalar_t>(g, rows, ci.const_data_ptr<int32_t>(), v.const_data_ptr<scalar_t>(),
                                  x.const_data_ptr<scalar_t>(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                                  r.defined() ? r.const_data_ptr<scalar_t>() : nullptr, relu,
                                  out.mutable_data_ptr<scalar_t>(), stream);
  });
  return max_pool ? at::max_pool2d(out, {2, 2}, {2, 2}) : out;
}

Tensor masked_conv2d_cuda(const Tensor& input, const Tensor& weight, const Tensor& mask,
                          const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups) {
  check_conv_input(input, "input");
  check_weight_mask(weight, mask, input);
  const ConvGeom g(input.sizes(), weight.sizes(), stride, padding, dilation, groups);
  check_bias(bias, input, g.O);
  const c10::cuda::CUDAGuard guard(input.device());
  Tensor out = at::empty({g.N, g.O, g.OH, g.OW}, input.options());
  if (out.numel() == 0) return out;
  const Tensor x = input.contiguous(), w = weight.contiguous(), m = mask.contiguous();
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  APB_DISPATCH(input.scalar_type(), "masked_conv2d_cuda", [&] {
    // Rows of fixed capacity taps(): the nonzero count never has to reach the host.
    const PackedRows p = pack_rows<scalar_t>(w.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(), g.O,
                                             g.taps(), input.options(), false, &g, stream);
    launch_conv_forward<scalar_t>(g, p.rows(), p.col.const_data_ptr<int32_t>(), p.val.const_data_ptr<scalar_t>(),
                                  x.const_data_ptr<scalar_t>(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                                  nullptr, false, out.mutable_data_ptr<scalar_t>(), stream);
  });
  return out;
}

Tensor sparse_conv2d_backward_input_cuda(const Tensor& grad_output, const Tensor& values, const Tensor& row_ptr,
                                         const Tensor& col_idx, at::IntArrayRef weight_size,
                                         at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, int64_t groups) {
  check_conv_input(grad_output, "grad_output");
  const ConvGeom g(input_size, weight_size, stride, padding, dilation, groups);
  check_grad_output(grad_output, g);
  check_csr(values, row_ptr, col_idx, g.O, grad_output);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  check_csr_contents(rp, ci, g.O, g.taps(), stream);
  Tensor gin = at::empty({g.N, g.C, g.H, g.W}, grad_output.options());
  if (gin.numel() == 0) return gin;
  const Tensor go = grad_output.contiguous(), v = values.contiguous();
  const int32_t* rpp = rp.const_data_ptr<int32_t>();
  const RowRange rows{rpp, rpp + 1, v.numel()};
  APB_DISPATCH(grad_output.scalar_type(), "sparse_conv2d_backward_input_cuda", [&] {
    // Entries regrouped per input channel by a sort: O(nnz) memory, no dense weight.
    const PackedRows p = transpose_csr<scalar_t>(rows, g.O, ci.const_data_ptr<int32_t>(),
                                                 v.const_data_ptr<scalar_t>(), v.numel(), g.taps(), g.C, &g,
                                                 grad_output.options(), stream);
    launch_conv_backward_input<scalar_t>(g, p, go, gin, stream);
  });
  return gin;
}

Tensor masked_conv2d_backward_input_cuda(const Tensor& grad_output, const Tensor& weight, const Tensor& mask,
                                         at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, int64_t groups) {
  check_conv_input(grad_output, "grad_output");
  check_weight_mask(weight, mask, grad_output);
  const ConvGeom g(input_size, weight.sizes(), stride, padding, dilation, groups);
  check_grad_output(grad_output, g);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  Tensor gin = at::empty({g.N, g.C, g.H, g.W}, grad_output.options());
  if (gin.numel() == 0) return gin;
  TORCH_CHECK(g.O * g.taps() < (int64_t(1) << 31), "weight has ", g.O * g.taps(),
              " entries; the CUDA kernels index it with int32 (at most 2^31 - 1)");
  const Tensor go = grad_output.contiguous(), w = weight.contiguous(), m = mask.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The weight is dense already: its transposition [C][Og][KH][KW] costs no more memory.
  Tensor wt = at::empty({g.O * g.taps()}, grad_output.options());
  APB_DISPATCH(grad_output.scalar_type(), "masked_conv2d_backward_input_cuda", [&] {
    const int64_t n = wt.numel();
    if (n > 0) {
      transpose_weight_kernel<scalar_t><<<elem_blocks(n), kElemThreads, 0, stream>>>(
          w.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(), g.G, g.Og, g.Cg, g.KH * g.KW,
          wt.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const PackedRows p = pack_rows<scalar_t>(wt.const_data_ptr<scalar_t>(), nullptr, g.C, g.Og * g.KH * g.KW,
                                             grad_output.options(), true, &g, stream);
    launch_conv_backward_input<scalar_t>(g, p, go, gin, stream);
  });
  return gin;
}

Tensor sparse_linear_cuda(const Tensor& input, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                          int64_t in_features, const std::optional<Tensor>& bias) {
  TORCH_CHECK(input.dim() >= 1, "input must have at least 1 dim");
  TORCH_CHECK(supported_dtype(input.scalar_type()), "input must be float32, float64 or bfloat16 (CUDA), got ",
              input.scalar_type());
  TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor, got one on ", input.device());
  TORCH_CHECK(input.size(-1) == in_features, "input has ", input.size(-1), " features, expected in_features = ",
              in_features);
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1, "row_ptr must be a 1-D tensor with at least 1 entry");
  const int64_t R = row_ptr.numel() - 1;
  check_csr(values, row_ptr, col_idx, R, input);
  check_bias(bias, input, R);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  check_csr_contents(rp, ci, R, in_features, stream);
  Tensor out = at::empty(with_last(input.sizes(), R), input.options());
  if (out.numel() == 0) return out;
  const Tensor x = input.contiguous(), v = values.contiguous();
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  const int64_t B = leading_numel(input.sizes());
  const int32_t* rpp = rp.const_data_ptr<int32_t>();
  const RowRange rows{rpp, rpp + 1, v.numel()};
  APB_DISPATCH(input.scalar_type(), "sparse_linear_cuda", [&] {
    launch_linear_rows<scalar_t>(rows, R, ci.const_data_ptr<int32_t>(), v.const_data_ptr<scalar_t>(),
                                 x.const_data_ptr<scalar_t>(), B, in_features,
                                 b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                                 out.mutable_data_ptr<scalar_t>(), stream);
  });
  return out;
}

Tensor sparse_linear_backward_input_cuda(const Tensor& grad_output, const Tensor& values, const Tensor& row_ptr,
                                         const Tensor& col_idx, int64_t in_features) {
  TORCH_CHECK(grad_output.dim() >= 1, "grad_output must have at least 1 dim");
  TORCH_CHECK(supported_dtype(grad_output.scalar_type()),
              "grad_output must be float32, float64 or bfloat16 (CUDA), got ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.is_cuda(), "grad_output must be a CUDA tensor, got one on ", grad_output.device());
  TORCH_CHECK(in_features >= 0, "in_features must be non-negative, got ", in_features);
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1, "row_ptr must be a 1-D tensor with at least 1 entry");
  const int64_t R = row_ptr.numel() - 1;
  TORCH_CHECK(grad_output.size(-1) == R, "grad_output has ", grad_output.size(-1), " features, expected ", R);
  check_csr(values, row_ptr, col_idx, R, grad_output);
  TORCH_CHECK(in_features < (int64_t(1) << 31) - 1, "in_features must be below 2^31 - 1, got ", in_features);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  check_csr_contents(rp, ci, R, in_features, stream);
  Tensor gin = at::empty(with_last(grad_output.sizes(), in_features), grad_output.options());
  if (gin.numel() == 0) return gin;
  const Tensor gy = grad_output.contiguous(), v = values.contiguous();
  const int64_t B = leading_numel(grad_output.sizes());
  const int32_t* rpp = rp.const_data_ptr<int32_t>();
  const RowRange rows{rpp, rpp + 1, v.numel()};
  APB_DISPATCH(grad_output.scalar_type(), "sparse_linear_backward_input_cuda", [&] {
    // CSC of W (in_features rows) by a sort on the device: O(nnz) memory, no dense W^T.
    const PackedRows p = transpose_csr<scalar_t>(rows, R, ci.const_data_ptr<int32_t>(), v.const_data_ptr<scalar_t>(),
                                                 v.numel(), in_features, in_features, nullptr,
                                                 grad_output.options(), stream);
    launch_linear_rows<scalar_t>(p.rows(), in_features, p.col.const_data_ptr<int32_t>(),
                                 p.val.const_data_ptr<scalar_t>(), gy.const_data_ptr<scalar_t>(), B, R, nullptr,
                                 gin.mutable_data_ptr<scalar_t>(), stream);
  });
  return gin;
}

}  // namespace

TORCH_LIBRARY_IMPL(apb_sparse, CUDA, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cuda);
  m.impl("sparse_conv2d_backward_input", &sparse_conv2d_backward_input_cuda);
  m.impl("masked_conv2d", &masked_conv2d_cuda);
  m.impl("masked_conv2d_backward_input", &masked_conv2d_backward_input_cuda);
  m.impl("sparse_linear", &sparse_linear_cuda);
  m.impl("sparse_linear_backward_input", &sparse_linear_backward_input_cuda);
}

}  // namespace apb_sparse
