// CPU implementations of the apb_sparse ops (schemas in csrc/ops.cpp).
//
// Every op is lowered onto kernel::row_spmm (row_spmm.h):
//  * sparse/masked conv forward: rows = output channels; the input is re-laid out once per call
//    into zero-padded, stride-phase-split planes ("grid") so that every nonzero tap reads a
//    contiguous strip of the grid at a precomputed offset, for any stride, padding and dilation.
//  * conv backward-to-input: rows = (input channel, stride phase) planes, nonzeros = the
//    transposed weight, source = grad_output scattered into the same grid coordinates.
//  * linear: rows = output (or, backward, input) features, positions = batch.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <unordered_map>
#include <vector>
#include <cstdlib>

#include "row_spmm.h"

namespace apb_sparse {

/// nn.MaxPool2d(2, 2)'s values (cpu/pool_ops.cpp): sparse_conv2d's max_pool where the lanes
/// layout's store cannot take it.
at::Tensor max_pool2x2_forward(const at::Tensor& input);

namespace {

using at::Tensor;
using kernel::RowSpmmArgs;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/// A cache of freed output blocks, by exact size.  The CPU forward ops allocate their outputs
/// here (at::from_blob with a deleter that gives the block back) instead of through the default
/// allocator, whose large blocks are fresh mmap'ed pages on every call once glibc trims or maps
/// them (a page fault per 4 KiB at first touch).  At most output_cache_bytes() are kept; the
/// rest is freed.  Never destroyed: tensors may outlive static destruction at exit.
class OutputPool {
 public:
  static OutputPool& get() {
    static OutputPool* pool = new OutputPool();
    return *pool;
  }
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= bytes;
        return p;
      }
    }
    void* p = std::aligned_alloc(64, round_up(int64_t(bytes), 64));
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (int64_t(cached_ + bytes) <= kernel::output_cache_bytes()) {
        free_[bytes].push_back(p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }
  /// Frees cached blocks until at most `cap` bytes are kept.
  void trim(int64_t cap) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& kv : free_) {
      while (!kv.second.empty() && int64_t(cached_) > cap) {
        std::free(kv.second.back());
        kv.second.pop_back();
        cached_ -= kv.first;
      }
    }
  }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
};

/// An uninitialised contiguous CPU tensor from the output pool (plain at::empty when the cache is
/// off or the tensor is empty).
Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = size_t(numel) * options.dtype().itemsize();
  if (numel == 0 || kernel::output_cache_bytes() == 0 || options.device().type() != at::kCPU) {
    return at::empty(sizes, options);
  }
  void* p = OutputPool::get().take(bytes);
  return at::from_blob(p, sizes, [bytes](void* q) { OutputPool::get().give(q, bytes); }, options);
}

/// Largest spatial size, kernel size, padding and dilation accepted (so that products of two stay
/// in int64), and largest working set of a convolution in elements.
constexpr int64_t kMaxDim = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxElements = int64_t(1) << 48;

/// Convolution geometry in "grid" coordinates.  The padded input (Hp x Wp) is split into
/// sh*sw stride phases; phase (a, b) holds padded pixels (i*sh + a, j*sw + b) at grid (i, j) of
/// an Hq x Wq plane.  Output (n, oh, ow) lives at grid position p = n*Hq*Wq + oh*Wq + ow, and
/// tap (kh, kw) reads phase ((kh*dh) % sh, (kw*dw) % sw) at p + ((kh*dh)/sh)*Wq + (kw*dw)/sw.
struct ConvGeom {
  int64_t N, C, H, W;
  int64_t O, Cg, KH, KW, G, Og;
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t Hp, Wp, OH, OW, Hq, Wq, S, plane;

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
    TORCH_CHECK(N >= 0 && C >= 0 && H >= 0 && W >= 0, "input size must be non-negative, got ", input_size);
    // Cg == 0 (no input channels) is valid: the output is the bias; the op entries handle it.
    TORCH_CHECK(O >= 0 && Cg >= 0 && KH > 0 && KW > 0,
                "weight_size must be non-negative with a positive kernel size, got ", weight_size);
    G = groups;
    // Every term below stays far from int64 overflow once each factor is below 2^31.
    TORCH_CHECK(H <= kMaxDim && W <= kMaxDim, "input height and width must be at most 2^31 - 1, got ", input_size);
    TORCH_CHECK(KH <= kMaxDim && KW <= kMaxDim && O <= kMaxDim && Cg <= kMaxDim,
                "weight_size entries must be at most 2^31 - 1, got ", weight_size);
    TORCH_CHECK(padding[0] <= kMaxDim && padding[1] <= kMaxDim, "padding must be at most 2^31 - 1, got ", padding);
    TORCH_CHECK(dilation[0] <= kMaxDim && dilation[1] <= kMaxDim, "dilation must be at most 2^31 - 1, got ",
                dilation);
    TORCH_CHECK(G <= kMaxDim, "groups must be at most 2^31 - 1, got ", groups);
    TORCH_CHECK(C == Cg * G, "input has ", C, " channels, expected weight_size[1] * groups = ", Cg * G);
    TORCH_CHECK(O % G == 0, "weight_size[0] (", O, ") must be divisible by groups (", G, ")");
    Og = O / G;
    ph = padding[0]; pw = padding[1]; dh = dilation[0]; dw = dilation[1];
    Hp = H + 2 * ph; Wp = W + 2 * pw;
    TORCH_CHECK(Hp >= dh * (KH - 1) + 1 && Wp >= dw * (KW - 1) + 1,
                "input (", H, "x", W, ") with padding ", padding, " is smaller than the dilated kernel (dilation ",
                dilation, ", kernel ", KH, "x", KW, ")");
    // A stride at least the padded size gives one output row (column) that reads the same pixels
    // whatever the stride: use the padded size, so that the stride-phase grid (S = sh * sw planes)
    // stays as small as the padded input (a stride of 2^32 would otherwise overflow S).
    sh = std::min<int64_t>(stride[0], Hp); sw = std::min<int64_t>(stride[1], Wp);
    OH = (Hp - dh * (KH - 1) - 1) / sh + 1;
    OW = (Wp - dw * (KW - 1) - 1) / sw + 1;
    Hq = (Hp + sh - 1) / sh; Wq = (Wp + sw - 1) / sw;
    TORCH_CHECK(KH * KW <= kMaxDim && taps() <= kMaxDim, "weight_size ", weight_size,
                " has more than 2^31 - 1 taps per filter");
    // Working sets: the phase grid (C * S planes of N * Hq * Wq), the tap-major layout (C * kH * kW
    // strips of N * OH * OW) and the transposed grad_output (O rows of about N * Hq * Wq).  Bounded
    // so that no size computed from them overflows.
    S = checked_mul(sh, sw);
    const int64_t per_image = checked_mul(checked_mul(S, Hq), Wq);
    const int64_t n1 = std::max<int64_t>(N, 1), c1 = std::max<int64_t>(C, 1);
    plane = checked_mul(N, checked_mul(Hq, Wq));
    checked_mul(c1, checked_mul(per_image, n1));
    checked_mul(checked_mul(c1, KH * KW), checked_mul(n1, checked_mul(OH, OW)));
    checked_mul(std::max<int64_t>(O, 1), checked_mul(n1, per_image));
    checked_mul(checked_mul(n1, O), checked_mul(OH, OW));
  }
  /// a * b, refusing products above kMaxElements: the input size, padding and stride of the
  /// convolution make its working set too large.
  int64_t checked_mul(int64_t a, int64_t b) const {
    TORCH_CHECK(a == 0 || b <= kMaxElements / a, "convolution too large: input (", N, ", ", C, ", ", H, ", ", W,
                ") with padding (", ph, ", ", pw, ") and stride (", sh, ", ", sw, ") needs more than 2^48 ",
                "elements of working memory");
    return a * b;
  }
  int64_t taps() const { return Cg * KH * KW; }
  /// Stride phase read by tap (kh, kw).
  int64_t phase(int64_t kh, int64_t kw) const { return ((kh * dh) % sh) * sw + (kw * dw) % sw; }
  /// [S] 1 for the stride phases that some tap reads (a 1x1 stride-2 conv reads one of four).
  std::vector<uint8_t> phases_read() const {
    std::vector<uint8_t> used(S, 0);
    for (int64_t kh = 0; kh < KH; ++kh)
      for (int64_t kw = 0; kw < KW; ++kw) used[phase(kh, kw)] = 1;
    return used;
  }
  /// Offset inside a phase plane of tap (kh, kw).
  int64_t tap_offset(int64_t kh, int64_t kw) const { return ((kh * dh) / sh) * Wq + (kw * dw) / sw; }
  int64_t max_tap_offset() const { return tap_offset(KH - 1, KW - 1); }
  /// For every tap index: its input channel within the group (high part) and stride phase,
  /// packed as c * S + phase, and its offset inside the phase plane.
  void tap_rows(std::vector<int64_t>& row, std::vector<int64_t>& shift) const {
    row.resize(taps());
    shift.resize(taps());
    // The (kh, kw) pattern is the same for every channel: compute it once (divisions are costly
    // at 4608 taps per layer, and this runs on every call).
    const int64_t KK = KH * KW;
    for (int64_t k = 0; k < KK; ++k) {
      row[k] = phase(k / KW, k % KW);
      shift[k] = tap_offset(k / KW, k % KW);
    }
    for (int64_t c = 1; c < Cg; ++c)
      for (int64_t k = 0; k < KK; ++k) {
        row[c * KK + k] = c * S + row[k];
        shift[c * KK + k] = shift[k];
      }
  }
};

/// Builds the destination runs of every (class, tile) pair (see kernel::RowSpmmArgs).  Segments
/// must be added class by class, in increasing position order within a class.
class RunBuilder {
 public:
  RunBuilder(int64_t length, int64_t nclass, int64_t tile_width)
      : tw_(tile_width), ntiles_((length + tile_width - 1) / tile_width), nclass_(nclass),
        index_(nclass * ntiles_ + 1, 0) {}

  /// Positions [p, p + len) of class c go to dst + k * step.
  void add(int64_t c, int64_t p, int64_t len, int64_t step, int64_t dst) {
    while (len > 0) {
      const int64_t t = p / tw_;
      TORCH_INTERNAL_ASSERT(c < nclass_ && t < ntiles_, "run outside the tile grid");
      open_until(c * ntiles_ + t);
      const int64_t n = std::min(len, (t + 1) * tw_ - p);
      runs_.push_back(kernel::Run{int32_t(p - t * tw_), int32_t(n), step, dst});
      p += n;
      dst += n * step;
      len -= n;
    }
  }
  int64_t ntiles() const { return ntiles_; }
  const kernel::Run* runs() const { return runs_.data(); }
  const int32_t* index() {
    open_until(nclass_ * ntiles_);
    index_[nclass_ * ntiles_] = int32_t(runs_.size());
    return index_.data();
  }

 private:
  /// Marks every (class, tile) slot before `slot` (and `slot` itself) as starting here.
  void open_until(int64_t slot) {
    TORCH_INTERNAL_ASSERT(slot >= next_ - 1, "runs added out of order");
    while (next_ <= slot) index_[next_++] = int32_t(runs_.size());
  }
  int64_t tw_, ntiles_, nclass_;
  std::vector<int32_t> index_;
  std::vector<kernel::Run> runs_;
  int64_t next_ = 0;
};

/// How rows [0, R) (weights = nonzeros + a fixed cost) or positions [0, length) are split
/// across threads.  Balancing by nonzeros rather than by row count matters for unevenly pruned
/// layers.
struct Split {
  int64_t nthreads = 1;
  bool by_rows = true;
  std::vector<int64_t> bounds;  ///< [nthreads + 1] row bounds (by_rows) or position bounds
};

/// Threads for a call doing `work` multiply-adds and copies: 1 below kernel::min_parallel_work().
int64_t threads_for(int64_t work) {
  return work < kernel::min_parallel_work() ? 1 : std::max<int64_t>(1, at::get_num_threads());
}

/// Bounds of `nthreads` row ranges of [0, R) with equal weight (nonzeros + 2 per row for the
/// epilogue): bounds[t] .. bounds[t + 1] is thread t's share.
std::vector<int64_t> balanced_row_bounds(const int32_t* row_ptr, int64_t R, int64_t nthreads) {
  std::vector<int64_t> bounds(nthreads + 1, 0);
  bounds[nthreads] = R;
  const double total = double(row_ptr[R] + 2 * R);
  int64_t r = 0;
  for (int64_t t = 1; t < nthreads; ++t) {
    const double target = total * t / nthreads;
    while (r < R && double(row_ptr[r] + 2 * r) < target) ++r;
    bounds[t] = r;
  }
  return bounds;
}

Split plan_split(const int32_t* row_ptr, int64_t R, int64_t length, int64_t tile_width, int64_t extra_work = 0) {
  Split sp;
  const int64_t nnz = row_ptr[R];
  sp.nthreads = threads_for((nnz + R) * length + extra_work);
  if (sp.nthreads == 1 || R >= 4 * sp.nthreads) {
    sp.bounds = balanced_row_bounds(row_ptr, R, sp.nthreads);
  } else {
    sp.bounds.assign(sp.nthreads + 1, 0);
    sp.by_rows = false;
    const int64_t per = round_up((length + sp.nthreads - 1) / sp.nthreads, tile_width);
    for (int64_t t = 0; t <= sp.nthreads; ++t) sp.bounds[t] = std::min(length, t * per);
  }
  return sp;
}

/// Runs thread t's share of a split.
template <typename T>
void run_share(const Split& sp, int64_t t, const RowSpmmArgs<T>& a, int64_t R) {
  const int64_t b = sp.bounds[t], e = sp.bounds[t + 1];
  if (b >= e) return;
  if (sp.by_rows) {
    kernel::row_spmm(a, b, e, 0, a.length);
  } else {
    kernel::row_spmm(a, 0, R, b, e);
  }
}

/// Runs the kernel on rows [0, R) over all positions as planned by `sp`.
template <typename T>
void run_split(const Split& sp, const RowSpmmArgs<T>& a, int64_t R) {
  if (sp.nthreads == 1) return kernel::row_spmm(a, 0, R, 0, a.length);
  at::parallel_for(0, sp.nthreads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) run_share(sp, t, a, R);
  });
}

/// Runs the kernel on rows [0, R) over all positions, split across threads.
template <typename T>
void parallel_row_spmm(const RowSpmmArgs<T>& a, int64_t R) {
  if (R == 0 || a.length == 0) return;
  run_split(plan_split(a.row_ptr, R, a.length, kernel::tile_width<T>()), a, R);
}

/// Positions per cache block so that the strips all rows read (sources planes x block) stay
/// within about 256 KiB of L2.
template <typename T>
int64_t cache_block(int64_t source_rows) {
  const int64_t TW = kernel::tile_width<T>();
  const int64_t b = (256 * 1024) / (std::max<int64_t>(source_rows, 1) * int64_t(sizeof(T)));
  return std::max<int64_t>(TW, b / TW * TW);
}

/// Input-channel (L1) blocking of a forward convolution (kernel::RowSpmmArgs::tap_chunk): picks a
/// position block of a few register tiles and the input channels per tap chunk so that the strips
/// one chunk reads over one block take about 24 KiB (under L1 on every x86 seen, leaving room for
/// the weights and partial sums).  A chunk holds at least 24 nonzeros per row on average, so that
/// saving and reloading the partial sums stays small next to the multiply-adds.  Leaves `a` as it
/// is when all channels fit anyway.
template <typename T>
void set_channel_chunks(RowSpmmArgs<T>& a, const ConvGeom& g, int64_t nnz, bool taps_layout, bool row_tiles,
                        int64_t nused_phases, bool shifted = false) {
  const int64_t TW = kernel::tile_width<T>(), KK = g.KH * g.KW;
  const int64_t ntiles = (a.length + TW - 1) / TW;
  const int64_t bt = std::min<int64_t>(ntiles, row_tiles ? 4 : 2);  // tiles per position block
  const int64_t halo_rows = ((g.KH - 1) * g.dh) / g.sh;
  int64_t channel_bytes;
  if (taps_layout) {
    channel_bytes = KK * bt * TW;
  } else if (shifted) {
    channel_bytes = g.KW * (bt * (TW / g.OW) + halo_rows) * g.OW;  // KW cropped copies per channel
  } else if (row_tiles) {
    channel_bytes = nused_phases * (bt * (TW / g.OW) + halo_rows) * g.Wq;
  } else {
    channel_bytes = nused_phases * (bt * TW + g.max_tap_offset());
  }
  channel_bytes *= int64_t(sizeof(T));
  // The tap-major layout (4x4 maps) is left unblocked: its strips are short (one register tile per
  // row), and chunking measured 3-10x slower there (per-chunk overhead against ~16 FMAs).
  if (taps_layout) return;
  int64_t ch = std::max<int64_t>(1, (int64_t(24) << 10) / std::max<int64_t>(channel_bytes, 1));
  const double per_row = double(nnz) / double(std::max<int64_t>(g.O, 1));  // nonzeros per output channel
  if (per_row > 0) ch = std::max<int64_t>(ch, int64_t(24.0 * double(g.Cg) / per_row + 0.999));
  if (ch >= g.Cg) return;
  a.tap_chunk = ch * KK;
  a.tap_chunks = (g.Cg + ch - 1) / ch;
  a.block = bt * TW;
}

/// Phases (a, 0) and (a, 1) of channel c of a stride-2 (in width) phase grid, for images
/// [n0, n0 + nb) of a unit-stride-in-width input: d0 / d1 are the two planes (see
/// fill_input_grid).
template <typename T>
void fill_grid_stride2_pair(const T* x, const int64_t* stride, const ConvGeom& g, int64_t n0, int64_t nb, int64_t c,
                            int64_t a, T* d0, T* d1) {
  const int64_t sN = stride[0], sC = stride[1], sH = stride[2];
  // Even image columns 2k go to phase pw % 2 at grid column k + pw / 2, odd ones 2k + 1 to phase
  // (pw + 1) % 2 at grid column k + (pw + 1) / 2.
  const int64_t ne = (g.W + 1) / 2, no = g.W / 2;
  const int64_t pe = g.pw % 2, ce = g.pw / 2, co = (g.pw + 1) / 2;
  // Written grid columns per phase; the others are padding.
  const int64_t wb[2] = {pe == 0 ? ce : co, pe == 0 ? co : ce};
  const int64_t we[2] = {wb[0] + (pe == 0 ? ne : no), wb[1] + (pe == 0 ? no : ne)};
  for (int64_t n = 0; n < nb; ++n) {
    const T* xc = x + (n0 + n) * sN + c * sC;
    for (int64_t i = 0; i < g.Hq; ++i) {
      T* row[2] = {d0 + (n * g.Hq + i) * g.Wq, d1 + (n * g.Hq + i) * g.Wq};
      const int64_t hh = i * g.sh + a - g.ph;
      if (hh < 0 || hh >= g.H) {
        for (int p = 0; p < 2; ++p)
          for (int64_t j = 0; j < g.Wq; ++j) row[p][j] = T(0);
        continue;
      }
      for (int p = 0; p < 2; ++p) {
        for (int64_t j = 0; j < std::min(wb[p], g.Wq); ++j) row[p][j] = T(0);
        for (int64_t j = we[p]; j < g.Wq; ++j) row[p][j] = T(0);
      }
      const T* xr = xc + hh * sH;
      T* de = row[pe] + ce;
      T* dd = row[1 - pe] + co;
      for (int64_t k = 0; k < no; ++k) {
        de[k] = xr[2 * k];
        dd[k] = xr[2 * k + 1];
      }
      if (ne > no) de[no] = xr[2 * no];
    }
  }
}

/// Copies images [n0, n0 + nb) of the input (any strides) into the zero-padded phase grid
/// [C][S][plane] at `out` (plane >= nb * Hq * Wq); planes (c, s) in [cs0, cs1) only, and only
/// the stride phases s with phase_used[s] (a 1x1 stride-2 conv reads one phase of four).
// Plain loops on purpose (setup.py disables GCC's loop-to-libc-call rewriting): rows are short.
template <typename T>
void fill_input_grid(const T* x, const int64_t* stride, const ConvGeom& g, int64_t n0, int64_t nb, int64_t plane,
                     int64_t cs0, int64_t cs1, const uint8_t* phase_used, T* out) {
  const int64_t sN = stride[0], sC = stride[1], sH = stride[2], sW = stride[3];
  // (c, s) and the phase (a, bb) advance with cs: no divisions per plane (this loop runs over
  // hundreds of planes per call, and an integer division costs tens of cycles).
  int64_t c = cs0 / g.S, a = (cs0 % g.S) / g.sw, bb = (cs0 % g.S) % g.sw;
  for (int64_t cs = cs0; cs < cs1; ++cs) {
    if (cs > cs0 && ++bb == g.sw) {
      bb = 0;
      if (++a == g.sh) {
        a = 0;
        ++c;
      }
    }
    if (!phase_used[a * g.sw + bb]) continue;
    if (g.sw == 2 && sW == 1 && bb == 0 && cs + 1 < cs1 && phase_used[a * g.sw + 1]) {
      // Both column phases of a stride-2 row in one pass (planes cs and cs + 1): one contiguous
      // read of each input row, deinterleaved into even and odd grid columns, instead of two
      // strided reads.  Image column w goes to phase (w + pw) % 2, grid column (w + pw) / 2.
      fill_grid_stride2_pair<T>(x, stride, g, n0, nb, c, a, out + cs * plane, out + (cs + 1) * plane);
      ++cs;
      ++bb;
      continue;
    }
    // Grid columns [j0, j1) of this phase hold image columns j * sw + bb - pw; the rest is padding.
    const int64_t j0 = std::min<int64_t>(g.Wq, std::max<int64_t>(0, (g.pw - bb + g.sw - 1) / g.sw));
    const int64_t j1 = std::max<int64_t>(j0, std::min<int64_t>(g.Wq, (g.W + g.pw - bb + g.sw - 1) / g.sw));
    const int64_t xoff = (j0 * g.sw + bb - g.pw) * sW, xstep = g.sw * sW;
    T* dst = out + cs * plane;
    for (int64_t n = 0; n < nb; ++n) {
      const T* xc = x + (n0 + n) * sN + c * sC;
      for (int64_t i = 0; i < g.Hq; ++i) {
        T* row = dst + (n * g.Hq + i) * g.Wq;
        const int64_t hh = i * g.sh + a - g.ph;
        if (hh < 0 || hh >= g.H) {
          for (int64_t j = 0; j < g.Wq; ++j) row[j] = T(0);
          continue;
        }
        const T* xr = xc + hh * sH + xoff;
        for (int64_t j = 0; j < j0; ++j) row[j] = T(0);
        if (xstep == 1) {
          for (int64_t j = 0; j < j1 - j0; ++j) row[j0 + j] = xr[j];
        } else {
          for (int64_t j = 0; j < j1 - j0; ++j) row[j0 + j] = xr[j * xstep];
        }
        for (int64_t j = j1; j < g.Wq; ++j) row[j] = T(0);
      }
    }
  }
}

/// Copies images [n0, n0 + nb) of the input (any strides) into the kw-shifted layout
/// (kernel::set_shifted_layout): unit u = c * KW + kw in [u0, u1) is a strip of `plane` values
/// holding, for image n, padded row r and column q < OW, the padded input pixel (r, q + kw * dw)
/// at (n * Hp + r) * OW + q.  Unit stride only (output column q reads padded column q + kw * dw).
template <typename T>
void fill_shifted(const T* x, const int64_t* stride, const ConvGeom& g, int64_t n0, int64_t nb, int64_t plane,
                  int64_t u0, int64_t u1, T* out) {
  const int64_t sN = stride[0], sC = stride[1], sH = stride[2], sW = stride[3];
  constexpr int64_t VW = kernel::vector_width<T>();
  // One zero-padded input row (Wp values, rounded up so that the last window's vector copies stay
  // inside), from which the KW windows are copied with whole-vector moves (OW % VW == 0 here).
  // Not a Scratch: the caller holds this thread's Scratch<T> (the layout itself).
  std::vector<T> tmp_row(round_up(g.Wp + VW, VW), T(0));
  T* tmp = tmp_row.data();
  for (int64_t c = u0 / g.KW; c * g.KW < u1; ++c) {
    const int64_t k0 = std::max<int64_t>(u0 - c * g.KW, 0), k1 = std::min<int64_t>(u1 - c * g.KW, g.KW);
    for (int64_t n = 0; n < nb; ++n) {
      const T* xc = x + (n0 + n) * sN + c * sC;
      for (int64_t r = 0; r < g.Hp; ++r) {
        const int64_t hh = r - g.ph, o = (n * g.Hp + r) * g.OW;
        if (hh < 0 || hh >= g.H) {
          for (int64_t kw = k0; kw < k1; ++kw) {
            T* row = out + (c * g.KW + kw) * plane + o;
            for (int64_t q = 0; q < g.OW; ++q) row[q] = T(0);
          }
          continue;
        }
        const T* xr = xc + hh * sH;
        if (sW == 1) {
          for (int64_t j = 0; j < g.W; ++j) tmp[g.pw + j] = xr[j];
        } else {
          for (int64_t j = 0; j < g.W; ++j) tmp[g.pw + j] = xr[j * sW];
        }
        for (int64_t kw = k0; kw < k1; ++kw) {
          T* row = out + (c * g.KW + kw) * plane + o;
          const T* src = tmp + kw * g.dw;
          for (int64_t q = 0; q < g.OW; q += VW) std::memcpy(row + q, src + q, VW * sizeof(T));
        }
      }
    }
  }
}

/// True when some c[j] is outside [0, cols).  An OR-reduction of unsigned compares, which the
/// compiler vectorises even for the baseline ISA; it runs on every call over every nonzero.
bool any_out_of_range(const int32_t* c, int64_t n, int64_t cols) {
  const uint32_t limit = uint32_t(std::min<int64_t>(cols, INT32_MAX));
  uint32_t bad = 0;
  for (int64_t j = 0; j < n; ++j) bad |= uint32_t(uint32_t(c[j]) >= limit);
  return bad != 0;
}

/// Validates a CSR weight given as tensors and returns raw pointers (values, row_ptr, col_idx).
void check_csr(const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx, int64_t rows,
               int64_t cols, const Tensor& input) {
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
  TORCH_CHECK(rows >= 0 && row_ptr.numel() == rows + 1, "row_ptr has ", row_ptr.numel(), " entries, expected ",
              rows + 1, " (one more than the number of rows, at least 1)");
  TORCH_CHECK(values.numel() <= kMaxDim, "values has ", values.numel(), " entries, more than int32 row_ptr can index");
  TORCH_CHECK(col_idx.numel() == values.numel(), "col_idx has ", col_idx.numel(), " entries but values has ",
              values.numel());
  const Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  const int32_t* r = rp.const_data_ptr<int32_t>();
  TORCH_CHECK(r[0] == 0 && r[rows] == values.numel(), "row_ptr must start at 0 and end at nnz = ", values.numel());
  // Branch-free reductions (vectorised): this check runs on every call, over every nonzero.
  bool sorted = true;
  for (int64_t i = 0; i < rows; ++i) sorted &= r[i] <= r[i + 1];
  TORCH_CHECK(sorted, "row_ptr must be non-decreasing");
  const int32_t* c = ci.const_data_ptr<int32_t>();
  const int64_t nnz = ci.numel();
  if (any_out_of_range(c, nnz, cols)) {
    int64_t j = 0;
    while (c[j] >= 0 && c[j] < cols) ++j;
    TORCH_CHECK(false, "col_idx entry ", c[j], " at position ", j, " out of range [0, ", cols, ")");
  }
}

/// Packs the nonzeros of a dense (O, K) row-major weight into CSR (column = tap index).
template <typename T>
void pack_dense(const T* w, const T* m, int64_t O, int64_t K, std::vector<int32_t>& row_ptr,
                std::vector<int32_t>& col, std::vector<T>& val) {
  row_ptr.assign(O + 1, 0);
  col.clear();
  val.clear();
  for (int64_t o = 0; o < O; ++o) {
    for (int64_t k = 0; k < K; ++k) {
      const T v = m ? w[o * K + k] * m[o * K + k] : w[o * K + k];
      if (v != T(0)) {
        col.push_back(int32_t(k));
        val.push_back(v);
      }
    }
    row_ptr[o + 1] = int32_t(col.size());
  }
}

/// Copies the padded windows of one (image, channel) for every tap: d[k * plane + i * OW + j] =
/// P[(i * sh + kh * dh) * Wp + j * sw + kw * dw] for tap k = (kh, kw).  OW is a template
/// parameter so that the short row copies unroll (this layout is used for OW < vector width).
template <typename T, int OW>
void copy_windows(const T* P, const ConvGeom& g, int64_t plane, T* d) {
  for (int64_t kh = 0; kh < g.KH; ++kh)
    for (int64_t kw = 0; kw < g.KW; ++kw, d += plane) {
      const T* src = P + kh * g.dh * g.Wp + kw * g.dw;
      for (int64_t i = 0; i < g.OH; ++i) {
        const T* r = src + i * g.sh * g.Wp;
        for (int j = 0; j < OW; ++j) d[i * OW + j] = r[j * g.sw];
      }
    }
}

/// Copies images [n0, n0 + nb) of the input (any strides) into the tap-major layout used for
/// narrow outputs: for every tap t = (c, kh, kw), a strip of `plane` values holding the input pixel
/// that tap reads for each compact output position q = n * OH * OW + i * OW + j (zero where it
/// falls into the padding, and zero after the chunk's last position).  Channels [c0, c1) only.
/// Each (image, channel) is first copied into a small zero-padded tile, so the window copies
/// need no bounds checks.
template <typename T>
void fill_taps(const T* x, const int64_t* stride, const ConvGeom& g, int64_t n0, int64_t nb, int64_t plane,
               int64_t c0, int64_t c1, T* out) {
  const int64_t sN = stride[0], sC = stride[1], sH = stride[2], sW = stride[3];
  const int64_t OHW = g.OH * g.OW, KK = g.KH * g.KW;
  thread_local std::vector<T> tile;
  if (int64_t(tile.size()) < g.Hp * g.Wp) tile.resize(g.Hp * g.Wp);
  T* P = tile.data();
  std::fill(P, P + g.Hp * g.Wp, T(0));  // the border stays zero; the interior is overwritten
  for (int64_t c = c0; c < c1; ++c) {
    T* d = out + c * KK * plane;
    for (int64_t n = 0; n < nb; ++n) {
      const T* xc = x + (n0 + n) * sN + c * sC;
      for (int64_t h = 0; h < g.H; ++h) {
        T* row = P + (h + g.ph) * g.Wp + g.pw;
        const T* xr = xc + h * sH;
        for (int64_t w = 0; w < g.W; ++w) row[w] = xr[w * sW];
      }
      T* dn = d + n * OHW;
      switch (g.OW) {
        case 1: copy_windows<T, 1>(P, g, plane, dn); break;
        case 2: copy_windows<T, 2>(P, g, plane, dn); break;
        case 3: copy_windows<T, 3>(P, g, plane, dn); break;
        case 4: copy_windows<T, 4>(P, g, plane, dn); break;
        case 5: copy_windows<T, 5>(P, g, plane, dn); break;
        case 6: copy_windows<T, 6>(P, g, plane, dn); break;
        case 7: copy_windows<T, 7>(P, g, plane, dn); break;
        default: TORCH_INTERNAL_ASSERT(false, "tap-major layout needs an output width below 8");
      }
    }
    for (int64_t k = 0; k < KK; ++k)
      for (int64_t q = nb * OHW; q < plane; ++q) d[k * plane + q] = T(0);
  }
}

/// A scratch buffer of at least n elements, kept per thread between calls so that the hot path
/// allocates (and page-faults) nothing; buffers above 16 MiB are not kept.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) {
    thread_local std::vector<T> kept;
    if (n * int64_t(sizeof(T)) > (int64_t(16) << 20)) {
      own_.reset(new T[n]);
      ptr_ = own_.get();
    } else {
      if (int64_t(kept.size()) < n) kept.resize(n);
      ptr_ = kept.data();
    }
  }
  T* get() const { return ptr_; }

 private:
  std::unique_ptr<T[]> own_;
  T* ptr_ = nullptr;
};

/// Elements of padding that let a scratch buffer start on a 64-byte boundary (aligned64).
template <typename T>
constexpr int64_t kAlignPad = 64 / int64_t(sizeof(T));
template <typename T>
T* aligned64(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

/// Units (32-byte vectors of images) of the images-in-lanes layout for this convolution, or 0 to
/// use the grid / tap-major layouts.  Batches of at least one vector of images take it:
///  * on small output maps (at most 64 pixels: the 8x8 / 4x4 / 2x2 maps of CIFAR networks' last
///    stages), where the other layouts waste lanes or pay an im2col;
///  * on larger maps where each input value feeds at least 16 multiply-adds and each output
///    channel has at least 16 nonzeros (the 90-95 % sparse 3x3 layers, not a 3-channel stem),
///    which repay the two transposes with aligned loads and the kernel's channel blocking.
///    Measured (AVX2 Zen 3, one thread, batch 32, 3x3): 64->64 on 32x32 at 90 % 8.0 -> 7.0 ms,
///    95 % 5.5 -> 4.8 ms, 128->128 on 16x16 at 95 % 4.3 -> 3.8 ms; but 99 % 64->64 1.6 ->
///    2.1 ms and 1x1 stride-2 shortcuts 0.9 -> 1.2-1.5 ms, where the transposes dominate.
///    Strided convs need only 4 multiply-adds per input value (their phase-split lanes layout beats
///    the phase grid by more).  Measured (AVX2 Zen 3, 2 threads, batch 32, alternating processes,
///    lanes against the grid): 3x3 stride 2 64->128 on 32x32 at 95 % (12.7 per input value) 0.72-0.81x
///    the time, at 97 % (7.6) 0.82x; 128->256 on 32x32 at 97 % (15) 0.79x; 32->64 on 64x64 at 95 %
///    (6.7, 14 nonzeros per output channel: kept on the grid by the 16-nonzero rule) 0.96x, at 97 %
///    1.07x; 1x1 stride-2 shortcuts (1.6-3.2 per input value) stay on the grid (lanes 1.07-1.28x).
///    Only where every thread takes whole chunks of images: at batch 8 on 2 threads (one chunk, its
///    rows split) the lanes layout took 1.1-1.9x the grid's time on those strided convs.
template <typename T>
int64_t lanes_units(const ConvGeom& g, int64_t nnz) {
  const int64_t VW = kernel::vector_width<T>();
  if (!kernel::lanes_enabled() || g.N < VW) return 0;
  const bool small = g.OH * g.OW <= 64;
  int64_t units = g.N >= 4 * VW ? 4 : g.N >= 2 * VW ? 2 : 1;
  // Fewer images per chunk where a chunk's input would outgrow a core's L2.  Measured (AVX2, one
  // thread, 90 % sparse 512->512 3x3 on 4x4 maps, batch 32, before the channel blocking): 8 images
  // per chunk 9.1 ms, 16: 9.4 ms, 32 (a 2.4 MB chunk input): 11.7 ms.
  while (units > 1 && g.C * g.Hp * g.Wp * units * VW * int64_t(sizeof(T)) > (int64_t(1) << 20)) units /= 2;
  // Fewer images per chunk where that gives every thread a whole chunk, as long as a block of
  // 8 / units pixels (32-byte accumulators) still fits the map.  The 512-channel 2x2 maps of VGG-16
  // (4x4 padded) take 4 units at 1 MiB: one chunk of 32 images, its rows split across the threads.
  // Measured (AVX2 Zen 3, 2 threads, batch 32): 512->512 3x3 on 2x2 0.86x the time at 95 % and
  // 0.85x at 90 % with 2 units; VGG-16 deployed 0.99 / 0.96 / 0.99x at 90 / 95 / 99 % (one process,
  // the two rules alternating, 11 rounds).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  auto chunks = [&](int64_t u) { return (g.N + u * VW - 1) / (u * VW); };
  while (units > 1 && chunks(units) < threads && 16 / units <= g.OH * g.OW) units /= 2;
  // Maps too narrow for the kernel's tiles (under 8 pixels wide) take two vectors of images per
  // pixel where the rows are long, whatever the chunk's size: their blocks of 6 pixels x 2 vectors
  // feed each weight broadcast to 12 FMAs instead of 8 (the AVX2 build; the AVX-512 and portable
  // builds take 64-byte accumulators there: not measured).  Measured (AVX2 Zen 3, 2 threads, batch
  // 32, one process, alternating, 9 rounds): 512->512 3x3 on 4x4 at 90 % 0.91x the time, stride-2
  // 256->512 into 4x4 0.94x, at 95 % 0.99x and 0.95x; at 99 % (46 nonzeros per row) 1.02-1.05x,
  // hence the 96-nonzero floor.
  if (units == 1 && small && g.OW < 8 && g.N >= 2 * VW && chunks(2) >= threads && nnz >= 96 * g.O &&
      kernel::active_isa() == kernel::kAvx2)
    units = 2;
  const int64_t per_input = g.sh * g.sw > 1 && chunks(units) >= threads ? 4 : 16;
  if (!small && (nnz * g.OH * g.OW < per_input * g.C * g.Hp * g.Wp || nnz < 16 * g.O)) return 0;
  // Small maps: a chunk's input and output must stay cache-sized (a few MiB), or the strips win.
  // (A stride-2 256->512 layer on 8x8 inputs took 6.4 ms in 8-image lanes against 5.5 ms.)
  const int64_t bytes = (g.C * g.Hp * g.Wp + g.O * g.OH * g.OW) * units * VW * int64_t(sizeof(T));
  if (small && bytes > (int64_t(4) << 20)) return 0;
  // The kernel's source offsets are 32-bit (kernel::LanesArgs::off): a chunk's input, stride-phase
  // planes rounded up included, must stay under 2^31 elements.
  if (g.C * (g.Hp + g.sh) * (g.Wp + g.sw) * units * VW >= (int64_t(1) << 31)) return 0;
  return units;
}

/// Input-channel (L1) blocking of the lanes kernel (kernel::LanesArgs::tap_chunk): channels per
/// chunk so that the input rows one block of output pixels reads from a chunk's channels take
/// about 32 KiB, but at least 24 nonzeros per row and chunk on average (each chunk reloads and
/// stores the block's partial sums).  Without blocking every output channel streams the whole
/// chunk input (up to 1 MiB) from L2 for a few multiply-adds per cache line.  Measured (AVX2 Zen 3,
/// one thread, 90 % sparse 512->512 3x3 on 4x4 maps, batch 32): 28-30 GFLOP/s unblocked, 33 with
/// 16 KiB chunks, 39 with 32 KiB, 34 with 64 KiB.
template <typename T>
void set_lanes_chunks(kernel::LanesArgs<T>& a, const ConvGeom& g, const std::vector<int64_t>& pix, int64_t L,
                      int64_t nnz) {
  const int64_t VW = kernel::vector_width<T>();
  // Pixels per block as lanes_rows has them with 32-byte accumulators (the AVX-512 build's 64-byte
  // ones give up to twice as many pixels per block; this only sizes the estimate below).
  const int64_t N = L / VW;
  const int64_t PB = std::max<int64_t>(1, 8 / N);
  const int64_t pb = std::min<int64_t>(PB, int64_t(pix.size()));
  // Span of one channel's plane that a block reads: from its first window to its last window's end.
  int64_t lo = pix[0], hi = pix[0];
  for (int64_t q = 0; q < pb; ++q) {
    lo = std::min(lo, pix[q]);
    hi = std::max(hi, pix[q]);
  }
  const int64_t window = hi - lo + (((g.KH - 1) * g.dh) * g.Wp + (g.KW - 1) * g.dw + 1) * L;
  const int64_t bytes = std::max<int64_t>(window * int64_t(sizeof(T)), 1);
  int64_t ch = std::max<int64_t>(1, (int64_t(32) << 10) / bytes);
  const double per_row = double(nnz) / double(std::max<int64_t>(g.O, 1));
  if (per_row > 0) ch = std::max<int64_t>(ch, int64_t(24.0 * double(g.Cg) / per_row + 0.999));
  if (ch >= g.Cg) return;
  a.tap_chunk = ch * g.KH * g.KW;
  a.tap_chunks = (g.Cg + ch - 1) / ch;
}

/// Everything a lanes-layout convolution needs besides its input and output (kernel::LanesArgs,
/// lanes_impl.h): the tap, pixel and padding tables of one chunk of L = units * vector_width
/// images, and the per-call nonzero offsets and chunk split points (shared by every chunk and
/// thread).  off: the caller's buffer of at least max(nnz, 1) offsets; parallel: compute those on
/// every thread (the call itself runs on several).
template <typename T>
struct LanesPlan {
  const ConvGeom& g;
  int64_t L, OHW, image_out, Hq, Wq, HWp, in_size, out_size;
  // Strided convs split each channel plane into its sh * sw stride phases ([phase][Hq][Wq]): the
  // output pixels of a row then read consecutive vectors of one phase for every tap (the
  // unsplit plane has them sw vectors apart, so each tap's block reads sw times the cache lines).
  bool phased;
  std::vector<int64_t> tap, pix, group_base, in_pix, pad;
  std::vector<int32_t> split;
  kernel::LanesArgs<T> proto{};

  /// Offset of padded pixel (y, x) in a channel plane.
  int64_t at(int64_t y, int64_t x) const {
    return (phased ? (((y % g.sh) * g.sw + x % g.sw) * Hq + y / g.sh) * Wq + x / g.sw : y * g.Wp + x) * L;
  }

  LanesPlan(const ConvGeom& geom, const int32_t* row_ptr, const int32_t* col, const T* val, const T* bias,
            int64_t units, int32_t* off, bool parallel)
      : g(geom), L(units * kernel::vector_width<T>()), OHW(geom.OH * geom.OW), image_out(geom.O * OHW),
        Hq((geom.Hp + geom.sh - 1) / geom.sh), Wq((geom.Wp + geom.sw - 1) / geom.sw),
        phased(geom.sh > 1 || geom.sw > 1) {
    HWp = phased ? g.sh * g.sw * Hq * Wq : g.Hp * g.Wp;
    in_size = g.C * HWp * L;
    out_size = image_out * L;
    tap.resize(g.taps());
    for (int64_t c = 0; c < g.Cg; ++c)
      for (int64_t kh = 0; kh < g.KH; ++kh)
        for (int64_t kw = 0; kw < g.KW; ++kw)
          tap[(c * g.KH + kh) * g.KW + kw] = c * HWp * L + at(kh * g.dh, kw * g.dw);
    pix.resize(OHW);
    for (int64_t i = 0; i < g.OH; ++i)
      for (int64_t j = 0; j < g.OW; ++j)
        pix[i * g.OW + j] = phased ? (i * Wq + j) * L : (i * g.sh * g.Wp + j * g.sw) * L;
    if (g.G > 1) {
      group_base.resize(g.O);
      for (int64_t o = 0; o < g.O; ++o) group_base[o] = (o / g.Og) * g.Cg * HWp * L;
    }
    // The stride phases that some tap reads (output pixel (i, j) reads padded pixel
    // (i * sh + kh * dh, j * sw + kw * dw)): a 1x1 stride-2 conv reads one phase of four, and the
    // fill skips the input pixels of the others (-1 in in_pix) and their padding.  Measured (AVX2
    // Zen 3, 2 threads, batch 32, 90 %, alternating processes): 1x1 stride-2 128->256 on 16x16
    // 0.87x the time, 256->512 on 8x8 0.91x.
    const std::vector<uint8_t> used = g.phases_read();
    auto read = [&](int64_t y, int64_t x) { return used[(y % g.sh) * g.sw + x % g.sw] != 0; };
    in_pix.resize(g.H * g.W);
    for (int64_t i = 0; i < g.H; ++i)
      for (int64_t j = 0; j < g.W; ++j)
        in_pix[i * g.W + j] = read(i + g.ph, j + g.pw) ? at(i + g.ph, j + g.pw) : -1;
    if (phased) {  // unsplit planes zero their padding rows and columns directly (lanes_fill_run)
      for (int64_t y = 0; y < g.Hp; ++y)
        for (int64_t x = 0; x < g.Wp; ++x)
          if ((y < g.ph || y >= g.ph + g.H || x < g.pw || x >= g.pw + g.W) && read(y, x)) pad.push_back(at(y, x));
    }
    proto = kernel::LanesArgs<T>{row_ptr, col, val, tap.data(), group_base.empty() ? nullptr : group_base.data(),
                                 pix.data(), OHW, units, nullptr, bias, nullptr};
    if (kernel::channel_blocking_enabled()) set_lanes_chunks<T>(proto, g, pix, L, int64_t(row_ptr[g.O]));
    proto.blocks_inner = kernel::lanes_blocks_inner();
    const int64_t nnz = row_ptr[g.O], nk = proto.tap_chunk > 0 ? proto.tap_chunks : 0;
    split.resize(nk > 0 ? g.O * (nk + 1) : 0);
    auto prepare = [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        const int32_t jb = row_ptr[o], je = row_ptr[o + 1];
        for (int32_t j = jb; j < je; ++j) off[j] = int32_t(tap[col[j]]);
        if (nk == 0) continue;
        // Columns are validated in range but not necessarily sorted: the points are monotone (each
        // starts where the previous stopped), so every nonzero still falls in exactly one chunk.
        int32_t* sp = split.data() + o * (nk + 1);
        int32_t j = jb;
        for (int64_t k = 0; k < nk; ++k) {
          sp[k] = j;
          const int64_t end = (k + 1) * proto.tap_chunk;
          while (j < je && col[j] < end) ++j;
        }
        sp[nk] = je;
      }
    };
    // On every thread whenever the call runs on several (the threads are awake for it anyway): on
    // the calling thread alone this took 1.5 % of ResNet-18's batch-32 forward (perf, 90 % sparse),
    // with the other thread spinning in the pool meanwhile.
    if (parallel && nnz >= 4096) {
      at::parallel_for(0, g.O, 16, prepare);
    } else {
      prepare(0, g.O);
    }
    proto.off = off;
    proto.split = nk > 0 ? split.data() : nullptr;
    // Tiles of 3 rows x 4 pixels (kernel::LanesArgs::tile_rows) where rows split into whole
    // 4-pixel segments (consecutive vectors: unit stride, or a stride phase); 4-wide maps keep 8-pixel blocks (a
    // tile would leave a 4-pixel rest).  Measured in-process against 8-pixel blocks (AVX2 Zen 3,
    // 2 threads, batch 32, 90 % sparse 3x3, interleaved, medians): 64->64 on 32x32 1.03x, 128->128
    // on 16x16 1.10x, 256->256 on 8x8 1.12x.
    if (kernel::lanes_tiles_enabled() && units == 1 && g.OW % 4 == 0 && g.OW >= 8 && g.OH >= 3) {
      proto.tile_rows = g.OH / 3 * 3;
      proto.out_w = g.OW;
    }
  }

  /// Channels [c0, c1) of images [n0, n0 + m) of x (strides s) into the chunk at buf (lanes m .. L
  /// and the padding zeroed).
  void fill(const T* x, const int64_t (&s)[4], T* buf, int64_t n0, int64_t m, int64_t c0, int64_t c1) const {
    kernel::LanesFill<T> f{x + n0 * s[0], s[0], s[1], s[2], s[3], m, g.H, g.W, g.ph, g.pw, g.Hp, g.Wp, L,
                           in_pix.data(), buf};
    if (phased) {
      f.plane = HWp * L;
      f.pad = pad.data();
      f.npad = int64_t(pad.size());
    }
    kernel::lanes_fill(f, c0, c1);
  }
};

/// The output side of a lanes-layout convolution: runs the kernel on one chunk of images and
/// stores its output to NCHW (y, image stride image_out) with the residual (rp) and ReLU, straight
/// from registers (direct) or through the chunk's output buffer and the transpose pass.
template <typename T>
struct LanesOutput {
  T* y;
  const T* rp;
  int64_t image_out, L;
  bool relu, direct;
  /// 2x2 max pool in the store (no residual): y's images hold image_y = O * (OH / 2) * (OW / 2)
  /// values, and the chunk's output goes through the store pass (no direct stores).
  bool pool;
  int64_t image_y, OH, OW;

  LanesOutput(const LanesPlan<T>& plan, int64_t units, T* y_, const T* rp_, bool relu_, bool pool_,
              bool allow_direct = true)
      : y(y_), rp(rp_), image_out(plan.image_out), L(plan.L), relu(relu_), pool(pool_),
        image_y(pool_ ? plan.g.O * (plan.g.OH / 2) * (plan.g.OW / 2) : plan.image_out), OH(plan.g.OH),
        OW(plan.g.OW) {
    // Float blocks of 8 pixels x 8 images go straight to NCHW from the kernel's registers
    // (kernel::LanesArgs::direct): no output transpose pass.  Measured (AVX2 Zen 3, one thread, 90 %
    // sparse, batch 32, against the transpose pass, 4 alternating process pairs): 512->512 on 4x4
    // 1.05x, 256->256 on 8x8 1.07x, 128->128 on 16x16 1.03x faster, but 64->64 on 32x32 0.95x (its
    // 8 stores per block land 256 KiB apart), so maps of up to 256 pixels only, without tiles.
    direct = std::is_same_v<T, float> && units == 1 && plan.OHW % 8 == 0 && plan.OHW <= 256 &&
             plan.proto.tile_rows == 0 && !pool && allow_direct;
  }
  kernel::LanesDirect<T> direct_for(int64_t n0, int64_t m) const {
    return kernel::LanesDirect<T>{y + n0 * image_out, rp ? rp + n0 * image_out : nullptr, image_out, m, relu};
  }
  /// Output positions [k0, k1) (of y's images: pooled ones with pool) of the chunk's images
  /// [n0, n0 + m) from ob to NCHW; rl: a residual in ob's layout (no direct stores then).
  void store(const T* ob, int64_t n0, int64_t m, int64_t k0, int64_t k1, const T* rl = nullptr) const {
    kernel::LanesStore<T> st{ob, L, m, image_y, y + n0 * image_y, rp ? rp + n0 * image_out : nullptr, relu};
    if (pool) st.OH = OH, st.OW = OW;
    st.res_lanes = rl;
    kernel::lanes_store(st, k0, k1);
  }
  /// The kernel over every row of a (src and dst set), then the store, on this thread.
  void run(kernel::LanesArgs<T> a, int64_t rows, int64_t n0, int64_t m, const T* rl = nullptr) const {
    const kernel::LanesDirect<T> d = direct_for(n0, m);
    a.direct = direct ? &d : nullptr;
    kernel::lanes(a, 0, rows);
    if (!direct) store(a.dst, n0, m, 0, image_y, rl);
  }
};

/// Forward convolution in the images-in-lanes layout (kernel::LanesArgs, lanes_impl.h) into a
/// fresh NCHW output.  Per chunk of L = units * vector_width images: the input is transposed once
/// into [C][Hp][Wp][L] with zero padding, the kernel writes [O][OH * OW][L], and one pass
/// transposes that back to NCHW, adding the residual and applying the ReLU on the way.  With at
/// least as many chunks as threads each thread takes whole chunks; otherwise the chunks run one
/// after another with their output channels split across threads by nonzeros.
template <typename T>
Tensor conv_forward_lanes(const Tensor& input, const ConvGeom& g, const int32_t* row_ptr, const int32_t* col,
                          const T* val, const Tensor& bias, const Tensor& residual, bool relu, int64_t units,
                          bool pool) {
  TORCH_INTERNAL_ASSERT(!(pool && residual.defined()), "the pooled store takes no residual");
  Tensor out = pool ? empty_output({g.N, g.O, g.OH / 2, g.OW / 2}, input.options())
                    : empty_output({g.N, g.O, g.OH, g.OW}, input.options());
  if (out.numel() == 0) return out;
  const Tensor b = bias.defined() ? bias.contiguous() : Tensor();
  const Tensor res = residual.defined() ? residual.contiguous() : Tensor();
  const T* x = input.const_data_ptr<T>();
  const int64_t s[4] = {input.stride(0), input.stride(1), input.stride(2), input.stride(3)};
  const T* rp = res.defined() ? res.const_data_ptr<T>() : nullptr;
  T* y = out.mutable_data_ptr<T>();
  const int64_t L = units * kernel::vector_width<T>(), nchunks = (g.N + L - 1) / L;
  // Kept per thread (not a fresh vector: zeroing and page-faulting up to 2 MB per call).
  const Scratch<int32_t> off_buf(std::max<int64_t>(row_ptr[g.O], 1));
  const int64_t nnz_work = int64_t(row_ptr[g.O]) * g.OH * g.OW * L * nchunks;
  const int64_t nthreads = threads_for(nnz_work + (g.C * g.Hp * g.Wp + g.O * g.OH * g.OW) * L * nchunks);
  const LanesPlan<T> plan(g, row_ptr, col, val, b.defined() ? b.const_data_ptr<T>() : nullptr, units, off_buf.get(),
                          nthreads > 1);
  const int64_t in_size = plan.in_size, out_size = plan.out_size;
  const LanesOutput<T> output(plan, units, y, rp, relu, pool);
  const kernel::LanesArgs<T>& proto = plan.proto;
  if (nchunks >= nthreads && nchunks > 1 && nthreads > 1) {
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      // One buffer (Scratch keeps one per thread), 64-byte aligned: every vector of L images then
      // sits on whole cache lines (unaligned, each 64-byte load spans two lines; aligning measured
      // 1.30x faster on a 90 %-sparse 512-channel 4x4 conv at batch 32, 15 of 15 interleaved rounds).
      const Scratch<T> scratch(in_size + out_size + kAlignPad<T>);
      T* buf = aligned64(scratch.get());
      kernel::LanesArgs<T> a = proto;
      a.src = buf;
      a.dst = buf + in_size;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t n0 = c * L, m = std::min(L, g.N - n0);
        plan.fill(x, s, buf, n0, m, 0, g.C);
        output.run(a, g.O, n0, m);
      }
    });
    return out;
  }
  // Few chunks: split each chunk's output channels across threads, balanced by nonzeros.
  const std::vector<int64_t> bounds = balanced_row_bounds(row_ptr, g.O, nthreads);
  const Scratch<T> scratch(in_size + out_size + kAlignPad<T>);
  T* buf = aligned64(scratch.get());
  kernel::LanesArgs<T> a = proto;
  a.src = buf;
  a.dst = buf + in_size;
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t n0 = c * L, m = std::min(L, g.N - n0);
    if (nthreads == 1) {
      plan.fill(x, s, buf, n0, m, 0, g.C);
      output.run(a, g.O, n0, m);
      continue;
    }
    const kernel::LanesDirect<T> d = output.direct_for(n0, m);
    a.direct = output.direct ? &d : nullptr;
    at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) { plan.fill(x, s, buf, n0, m, c0, c1); });
    at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) kernel::lanes(a, bounds[t], bounds[t + 1]);
    });
    if (!output.direct) {
      at::parallel_for(0, output.image_y, 64, [&](int64_t k0, int64_t k1) { output.store(a.dst, n0, m, k0, k1); });
    }
  }
  return out;
}

/// A chunk's output of the first conv of a pair ([C][OH * OW][L], bias added by the kernel) as the
/// second conv's zero-padded input chunk ([C][Hp][Wp][L], unit stride), with the first conv's ReLU:
/// row copies inside the cache instead of a transpose to NCHW and back.
template <typename T>
void lanes_repad(const T* src, T* dst, int64_t C, int64_t H, int64_t W, int64_t ph, int64_t pw, int64_t Hp,
                 int64_t Wp, int64_t L, bool relu) {
  const int64_t row = W * L;
  for (int64_t c = 0; c < C; ++c) {
    T* plane = dst + c * Hp * Wp * L;
    std::fill(plane, plane + ph * Wp * L, T(0));
    for (int64_t i = 0; i < H; ++i) {
      T* d = plane + (i + ph) * Wp * L;
      const T* r = src + (c * H + i) * row;
      std::fill(d, d + pw * L, T(0));
      T* __restrict o = d + pw * L;
      if (relu) {
        for (int64_t k = 0; k < row; ++k) o[k] = r[k] < T(0) ? T(0) : r[k];  // NaN stays NaN, as torch.relu
      } else {
        std::memcpy(o, r, size_t(row) * sizeof(T));
      }
      std::fill(o + row, d + Wp * L, T(0));
    }
    std::fill(plane + (ph + H) * Wp * L, plane + Hp * Wp * L, T(0));
  }
}

/// Two convolutions in a row, conv2(relu1?(conv1(x))) with conv2's residual, ReLU and max pool,
/// chunk by chunk in the images-in-lanes layout: each thread runs conv1 on a chunk of images,
/// turns its output into conv2's input chunk in cache (lanes_repad), and runs conv2 on it, so the
/// intermediate activation never goes to NCHW memory (no output transpose of conv1, no input
/// transpose of conv2).  Returns an undefined tensor where this does not apply (the caller then
/// runs the two convolutions): both layers must take the lanes layout (with the smaller of their
/// two chunk sizes), conv2 at unit stride, and every thread a whole chunk.
template <typename T>
Tensor conv_pair_lanes(const Tensor& input, const ConvGeom& g1, const int32_t* rp1, const int32_t* col1,
                       const T* val1, const Tensor& bias1, bool relu1, const ConvGeom& g2, const int32_t* rp2,
                       const int32_t* col2, const T* val2, const Tensor& bias2, const Tensor& residual, bool relu,
                       bool pool, const int32_t* rps = nullptr, const int32_t* cols = nullptr, const T* vals = nullptr,
                       const Tensor& biass = Tensor()) {
  const bool shortcut = rps != nullptr;
  if (pool && (residual.defined() || shortcut)) return Tensor();  // the pooled store takes no residual
  // The shortcut (1x1, conv1's stride, no padding) reads what conv1's tap (ph / dh, pw / dw) reads
  // for the same output pixel: it runs on conv1's input chunk as that tap.
  const int64_t kch = g1.ph / g1.dh, kcw = g1.pw / g1.dw;
  if (shortcut && (g1.G != 1 || g1.ph % g1.dh != 0 || g1.pw % g1.dw != 0 || kch >= g1.KH || kcw >= g1.KW))
    return Tensor();
  // Both layers at the smaller of their chunk sizes (fewer images per chunk is always valid).
  const int64_t units = std::min(lanes_units<T>(g1, int64_t(rp1[g1.O])), lanes_units<T>(g2, int64_t(rp2[g2.O])));
  if (units == 0 || g2.sh != 1 || g2.sw != 1 || g2.N == 0) return Tensor();
  const int64_t L = units * kernel::vector_width<T>(), nchunks = (g1.N + L - 1) / L;
  const int64_t nnz1 = rp1[g1.O], nnz2 = rp2[g2.O], nnzs = shortcut ? rps[g2.O] : 0;
  const int64_t work = (nnz1 * g1.OH * g1.OW + nnz2 * g2.OH * g2.OW + g1.C * g1.Hp * g1.Wp +
                        g2.O * g2.OH * g2.OW) * L * nchunks;
  const int64_t nthreads = threads_for(work);
  if (nchunks < nthreads) return Tensor();
  Tensor out = pool ? empty_output({g2.N, g2.O, g2.OH / 2, g2.OW / 2}, input.options())
                    : empty_output({g2.N, g2.O, g2.OH, g2.OW}, input.options());
  if (out.numel() == 0) return out;
  const Tensor b1 = bias1.defined() ? bias1.contiguous() : Tensor();
  const Tensor b2 = bias2.defined() ? bias2.contiguous() : Tensor();
  // One buffer for all offset tables (Scratch keeps one per element type and thread).
  const Scratch<int32_t> off_buf(std::max<int64_t>(nnz1 + nnz2 + nnzs, 1));
  const LanesPlan<T> plan1(g1, rp1, col1, val1, b1.defined() ? b1.const_data_ptr<T>() : nullptr, units, off_buf.get(),
                           nthreads > 1);
  const LanesPlan<T> plan2(g2, rp2, col2, val2, b2.defined() ? b2.const_data_ptr<T>() : nullptr, units,
                           off_buf.get() + nnz1, nthreads > 1);
  // The shortcut as a conv of conv1's geometry whose nonzeros all sit on the tap (kch, kcw).
  std::vector<int32_t> col_s;
  std::optional<ConvGeom> gs;
  const Tensor bs = biass.defined() ? biass.contiguous() : Tensor();
  std::unique_ptr<LanesPlan<T>> plans;
  if (shortcut) {
    col_s.resize(static_cast<size_t>(nnzs));
    for (int64_t j = 0; j < nnzs; ++j) col_s[j] = int32_t((cols[j] * g1.KH + kch) * g1.KW + kcw);
    const int64_t wsz[4] = {g2.O, g1.C, g1.KH, g1.KW}, st1[2] = {g1.sh, g1.sw}, pd1[2] = {g1.ph, g1.pw},
                  dl1[2] = {g1.dh, g1.dw}, shape1[4] = {g1.N, g1.C, g1.H, g1.W};
    gs.emplace(shape1, wsz, st1, pd1, dl1, 1);
    plans = std::make_unique<LanesPlan<T>>(*gs, rps, col_s.data(), vals, bs.defined() ? bs.const_data_ptr<T>() : nullptr,
                                           units, off_buf.get() + nnz1 + nnz2, nthreads > 1);
  }
  const T* x = input.const_data_ptr<T>();
  const int64_t s[4] = {input.stride(0), input.stride(1), input.stride(2), input.stride(3)};
  const Tensor res = residual.defined() ? residual.contiguous() : Tensor();
  const LanesOutput<T> output(plan2, units, out.mutable_data_ptr<T>(), res.defined() ? res.const_data_ptr<T>() : nullptr,
                              relu, pool, !shortcut);
  // Per thread: buffer A holds conv1's input chunk, then conv2's; buffer B conv1's output, then
  // conv2's; buffer S the shortcut's output (each 64-byte aligned).
  const int64_t size_a = round_up(std::max(plan1.in_size, plan2.in_size), kAlignPad<T>);
  const int64_t size_b = round_up(std::max(plan1.out_size, plan2.out_size), kAlignPad<T>);
  const int64_t size_s = shortcut ? plans->out_size : 0;
  auto run = [&](int64_t c0, int64_t c1) {
    const Scratch<T> scratch(size_a + size_b + size_s + kAlignPad<T>);
    T* a_buf = aligned64(scratch.get());
    T* b_buf = a_buf + size_a;
    T* s_buf = shortcut ? b_buf + size_b : nullptr;
    kernel::LanesArgs<T> a1 = plan1.proto, a2 = plan2.proto, as = shortcut ? plans->proto : plan1.proto;
    a1.src = a2.src = as.src = a_buf;
    a1.dst = a2.dst = b_buf;
    as.dst = s_buf;
    a1.direct = as.direct = nullptr;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * L, m = std::min(L, g1.N - n0);
      plan1.fill(x, s, a_buf, n0, m, 0, g1.C);
      kernel::lanes(a1, 0, g1.O);
      if (shortcut) kernel::lanes(as, 0, g2.O);
      lanes_repad(b_buf, a_buf, g2.C, g2.H, g2.W, g2.ph, g2.pw, g2.Hp, g2.Wp, L, relu1);
      output.run(a2, g2.O, n0, m, s_buf);
    }
  };
  if (nthreads > 1) {
    at::parallel_for(0, nchunks, 1, run);
  } else {
    run(0, nchunks);
  }
  return out;
}

/// Forward convolution from CSR (tap-index columns) into a fresh NCHW output.
///
/// Two input layouts (both computed per call from the input, in chunks of `nb` images that stay
/// in cache between being written and read):
///  * phase grid (fill_input_grid): the zero-padded, stride-phase-split input.  Every tap reads a
///    contiguous strip of it; output rows are stored by runs, or straight from registers when
///    whole output rows fill a tile (output-row tiles).
///  * tap-major (fill_taps), for outputs narrower than a vector (4x4 maps in float): a grid row
///    would fill under half a vector, so each tap gets its own strip of compact output positions
///    instead (an im2col whose cost is amortised over every output channel reading it).
/// With at least as many chunks as threads, each thread takes whole chunks (its own buffer, no
/// synchronisation); otherwise (small batches) one chunk is shared and its rows are split across
/// threads by nonzeros.
template <typename T>
Tensor conv_forward(const Tensor& input, const ConvGeom& g, const int32_t* row_ptr, const int32_t* col,
                    const T* val, const Tensor& bias, const Tensor& residual = Tensor(), bool relu = false) {
  if (const int64_t units = lanes_units<T>(g, int64_t(row_ptr[g.O]))) {
    return conv_forward_lanes<T>(input, g, row_ptr, col, val, bias, residual, relu, units, false);
  }
  Tensor out = empty_output({g.N, g.O, g.OH, g.OW}, input.options());
  if (out.numel() == 0) return out;
  const int64_t VW = kernel::vector_width<T>(), TW = kernel::tile_width<T>();
  const int64_t HWq = g.Hq * g.Wq, OHW = g.OH * g.OW, KK = g.KH * g.KW;
  // The tap-major layout writes KK values per input value; for a single image with few nonzeros
  // per tap (fewer than 16 output channels read each tap on average) that fill costs more than
  // the lanes it saves, and the grid's strip layout is faster (measured on 512-channel 4x4 maps).
  const bool taps_layout = kernel::row_tiles_enabled() && g.OW < VW &&
                           (g.N > 1 || int64_t(row_ptr[g.O]) >= 16 * g.C * KK);
  // Output-row tiles (see kernel::RowSpmmArgs::out_w), used when whole output rows fill a tile
  // exactly: no padding column is computed, and no tile is staged through memory.
  const bool row_tiles = kernel::row_tiles_enabled() && !taps_layout && g.OW % VW == 0 && TW % g.OW == 0 &&
                         g.OH % (TW / g.OW) == 0;
  // The kw-shifted layout (kernel::set_shifted_layout) makes every load of the multiply-adds
  // vector-aligned, for KW times the copying of the grid.  In auto mode it is used where a copied
  // value feeds at least 8 multiply-adds on average (nonzeros * OH >= 8 * C * KW * Hp): the dense
  // 3x3 layers (90-95 % sparse) of CIFAR ResNets and VGGs, not the 99 % ones, whose time is the copy.
  const int shifted_mode = kernel::shifted_layout();
  // Auto mode also wants rows of at least 16 floats (64-byte vectors) and batches of 8 or more:
  // measured (AVX-512, 90-95 % sparse 3x3 convs, one thread, interleaved in one process) 5-9 %
  // faster on 16- and 32-wide rows at batch 32, but 6-14 % slower on 8-wide rows (32-byte vectors)
  // and 10 % slower on 32-wide rows at batch 1.
  // On AVX2 (32-byte loads, fewer of them split across cache lines) the copies did not pay:
  // measured on an AMD EPYC (Zen 3), 90 % sparse, batch 32, 64->64 on 32x32 and 128->128 on 16x16:
  // 10-15 % slower with the layout, on one thread and on two.  Auto mode is AVX-512 only.
  const bool shifted = row_tiles && shifted_mode > 0 && g.sh == 1 && g.sw == 1 &&
                       (shifted_mode == 2 || (kernel::active_isa() == kernel::kAvx512 && g.KW > 1 && g.N >= 8 &&
                                              g.OW * int64_t(sizeof(T)) >= 64 &&
                                              int64_t(row_ptr[g.O]) * g.OH >= 8 * g.C * g.KW * g.Hp));
  // Bytes per image of the layout, and the cache budget of a chunk (the tap-major layout is
  // larger per image; 1 MiB keeps a few images per chunk for 512-channel layers in L2).
  const int64_t per_image = (taps_layout ? g.C * KK * OHW : shifted ? g.C * g.KW * g.Hp * g.OW : g.C * g.S * HWq) *
                            int64_t(sizeof(T));
  const int64_t budget = taps_layout ? (1 << 20) : (256 << 10);
  // Multiply-adds plus the layout fill: small calls stay on this thread (threads_for).
  const int64_t nthreads = threads_for(int64_t(row_ptr[g.O]) * g.N * OHW + g.N * per_image / int64_t(sizeof(T)));
  int64_t nb = std::max<int64_t>(1, budget / std::max<int64_t>(per_image, 1));
  nb = std::min(nb, g.N);
  if ((g.N + nb - 1) / nb < nthreads) nb = g.N;  // too few chunks for every thread: share one
  const int64_t nchunks = (g.N + nb - 1) / nb;
  const int64_t last = g.N % nb;
  // plane: the stride between the layout's strips (one per grid plane, or one per tap).
  // The shifted layout's strips start 64 bytes apart (the buffer is 64-byte aligned).
  const int64_t plane = taps_layout ? round_up(nb * OHW, VW)
                        : shifted   ? round_up(nb * g.Hp * g.OW, 64 / int64_t(sizeof(T)))
                                    : nb * HWq;
  const int64_t margin = taps_layout || shifted ? TW : HWq + TW + VW;
  const int64_t units = taps_layout ? g.C : shifted ? g.C * g.KW : g.C * g.S;  // strips filled per unit
  const int64_t grid_size = (taps_layout ? g.C * KK : shifted ? g.C * g.KW : g.C * g.S) * plane + margin;
  auto chunk_length = [&](int64_t m) {
    return taps_layout ? round_up(m * OHW, VW) : shifted ? m * OHW : round_up((m - 1) * HWq + g.OH * g.Wq, VW);
  };

  // Offset of every tap's strip inside a chunk's buffer, and of every output channel's group:
  // O(taps + O) per call, nothing per nonzero.
  std::vector<int64_t> tap(g.taps());
  {
    for (int64_t k = 0; k < KK; ++k)
      tap[k] = taps_layout ? k * plane
               : shifted   ? (k % g.KW) * plane + (k / g.KW) * g.dh * g.OW
                           : g.phase(k / g.KW, k % g.KW) * plane + g.tap_offset(k / g.KW, k % g.KW);
    const int64_t cstep = (taps_layout ? KK : shifted ? g.KW : g.S) * plane;
    for (int64_t c = 1; c < g.Cg; ++c)
      for (int64_t k = 0; k < KK; ++k) tap[c * KK + k] = c * cstep + tap[k];
  }
  std::vector<int64_t> group_base;
  if (g.G > 1) {
    group_base.resize(g.O);
    for (int64_t o = 0; o < g.O; ++o) group_base[o] = (o / g.Og) * g.Cg * (taps_layout ? KK : shifted ? g.KW : g.S) * plane;
  }
  // Where the positions of a chunk of m images are stored: one run per output row of the grid
  // (padding columns and the rounded tail are computed but never stored), one run per image of
  // the tap-major layout, or none with output-row tiles.
  auto make_runs = [&](int64_t m) {
    RunBuilder rb(row_tiles ? 0 : chunk_length(m), 1, TW);
    if (row_tiles) return rb;
    for (int64_t n = 0; n < m; ++n) {
      if (taps_layout) {
        rb.add(0, n * OHW, OHW, 1, n * g.O * OHW);
      } else {
        for (int64_t i = 0; i < g.OH; ++i) rb.add(0, n * HWq + i * g.Wq, g.OW, 1, n * g.O * OHW + i * g.OW);
      }
    }
    return rb;
  };
  RunBuilder runs = make_runs(nb);
  RunBuilder runs_last = make_runs(last ? last : nb);
  const int32_t* runs_index = runs.index();
  const int32_t* runs_last_index = runs_last.index();
  std::vector<int64_t> base(g.O);
  for (int64_t o = 0; o < g.O; ++o) base[o] = o * OHW;
  const Tensor b = bias.defined() ? bias.contiguous() : Tensor();
  const Tensor res = residual.defined() ? residual.contiguous() : Tensor();
  const T* x = input.const_data_ptr<T>();
  const int64_t xstride[4] = {input.stride(0), input.stride(1), input.stride(2), input.stride(3)};
  T* y = out.mutable_data_ptr<T>();
  const int64_t image_out = g.O * OHW;
  const std::vector<uint8_t> phase_used = g.phases_read();
  const int64_t nused_phases = std::count(phase_used.begin(), phase_used.end(), uint8_t(1));
  auto args_for = [&](const T* grid, int64_t n0, int64_t m) {
    TORCH_INTERNAL_ASSERT(m == nb || m == last, "bad chunk size");
    TORCH_INTERNAL_ASSERT((n0 + m) * image_out <= out.numel(), "chunk writes past the output");
    const RunBuilder& rb = m == nb ? runs : runs_last;
    RowSpmmArgs<T> a{row_ptr, col, tap.data(), group_base.empty() ? nullptr : group_base.data(), val, grid,
                     chunk_length(m), rb.runs(), m == nb ? runs_index : runs_last_index, rb.ntiles(), 1,
                     base.data(), b.defined() ? b.const_data_ptr<T>() : nullptr, y + n0 * image_out,
                     res.defined() ? res.const_data_ptr<T>() + n0 * image_out : nullptr, relu,
                     cache_block<T>(units * (taps_layout ? KK : 1))};
    if (taps_layout) a.tap_stride = plane;  // tap k's strip starts at k * plane
    if (row_tiles) {
      a.length = m * OHW;  // a multiple of the tile width by the conditions above
      a.out_w = g.OW;
      a.out_h = g.OH;
      a.src_row = shifted ? g.OW : g.Wq;
      a.src_image = shifted ? g.Hp * g.OW : HWq;
      a.dst_image = image_out;
    }
    if (kernel::channel_blocking_enabled()) {
      set_channel_chunks<T>(a, g, row_ptr[g.O], taps_layout, row_tiles, nused_phases, shifted);
    }
    return a;
  };
  // Fills units [u0, u1) (channels of the tap-major layout, planes of the grid) of a chunk.
  auto fill = [&](T* grid, int64_t n0, int64_t m, int64_t u0, int64_t u1) {
    if (taps_layout) {
      fill_taps<T>(x, xstride, g, n0, m, plane, u0, u1, grid);
    } else if (shifted) {
      fill_shifted<T>(x, xstride, g, n0, m, plane, u0, u1, grid);
    } else {
      fill_input_grid<T>(x, xstride, g, n0, m, plane, u0, u1, phase_used.data(), grid);
    }
  };
  // Largest shared chunk (bytes) that each thread fills privately (see below).
  constexpr int64_t private_limit = int64_t(1) << 20;
  if (nchunks >= nthreads && nchunks > 1) {
    auto chunks = [&](int64_t c0, int64_t c1) {
      // Not zeroed: the fills write every position of the chunk's images; the margin and a
      // partial chunk's unused tails only feed positions that are never stored.
      const Scratch<T> scratch(grid_size + kAlignPad<T>);
      T* grid = aligned64(scratch.get());
      std::fill(grid + grid_size - margin, grid + grid_size, T(0));
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t n0 = c * nb, m = std::min(nb, g.N - n0);
        fill(grid, n0, m, 0, units);
        // A partial last chunk keeps the strips laid out for nb images; its unused tails are
        // stale but only feed positions that no run stores.
        const RowSpmmArgs<T> a = args_for(grid, n0, m);
        kernel::row_spmm(a, 0, g.O, 0, a.length);
      }
    };
    if (nthreads == 1) {
      chunks(0, nchunks);
    } else {
      at::parallel_for(0, nchunks, 1, chunks);
    }
  } else if (grid_size * int64_t(sizeof(T)) <= private_limit &&
             int64_t(row_ptr[g.O]) * chunk_length(g.N) >= 16 * grid_size) {
    // One shared chunk that is small, with much more multiply-add work than fill: every thread
    // fills its own copy and runs its share of the rows.  The fill is repeated per thread, but
    // each thread then reads only its own cache; a copy filled by several threads would be read
    // mostly across cores.  (At very high sparsity the fill dominates and is split instead.)
    const RowSpmmArgs<T> proto = args_for(nullptr, 0, g.N);
    const Split sp = plan_split(row_ptr, g.O, proto.length, TW, grid_size);
    auto own = [&](int64_t t) {
      const Scratch<T> scratch(grid_size + kAlignPad<T>);
      T* grid = aligned64(scratch.get());
      std::fill(grid + grid_size - margin, grid + grid_size, T(0));
      fill(grid, 0, g.N, 0, units);
      RowSpmmArgs<T> a = proto;
      a.src = grid;
      run_share(sp, t, a, g.O);
    };
    if (sp.nthreads == 1) {
      own(0);
    } else {
      at::parallel_for(0, sp.nthreads, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t t = b0; t < b1; ++t) own(t);
      });
    }
  } else {
    const Scratch<T> scratch(grid_size + kAlignPad<T>);
    T* grid = aligned64(scratch.get());
    std::fill(grid + grid_size - margin, grid + grid_size, T(0));
    const RowSpmmArgs<T> a = args_for(grid, 0, g.N);
    const Split sp = plan_split(row_ptr, g.O, a.length, TW, grid_size);
    if (sp.nthreads == 1) {
      fill(grid, 0, g.N, 0, units);  // one thread computes: it fills too, into its own cache
    } else {
      at::parallel_for(0, units, 8, [&](int64_t b0, int64_t b1) { fill(grid, 0, g.N, b0, b1); });
    }
    run_split(sp, a, g.O);
  }
  return out;
}

/// grad_input of a convolution from CSR: transposes the nonzeros onto (input channel, phase)
/// rows and gathers grad_output placed on the forward grid.
template <typename T>
Tensor conv_backward_input(const Tensor& grad_output, const ConvGeom& g, const int32_t* row_ptr,
                           const int32_t* col, const T* val) {
  Tensor gin = at::empty({g.N, g.C, g.H, g.W}, grad_output.options());
  if (gin.numel() == 0) return gin;
  const int64_t VW = kernel::vector_width<T>(), TW = kernel::tile_width<T>();
  const int64_t M = round_up(g.max_tap_offset(), VW);
  const int64_t length = round_up(g.plane, VW);
  const int64_t Lrow = M + length + TW;
  // grad_output on the grid: row o holds position p at M + p; zero elsewhere.
  Tensor gog = at::zeros({g.O * Lrow}, grad_output.options());
  {
    T* dst = gog.mutable_data_ptr<T>();
    const T* go = grad_output.const_data_ptr<T>();
    const int64_t sN = grad_output.stride(0), sC = grad_output.stride(1), sH = grad_output.stride(2),
                  sW = grad_output.stride(3);
    at::parallel_for(0, g.O, 1, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o)
        for (int64_t n = 0; n < g.N; ++n)
          for (int64_t i = 0; i < g.OH; ++i) {
            T* d = dst + o * Lrow + M + (n * g.Hq + i) * g.Wq;
            const T* s = go + n * sN + o * sC + i * sH;
            for (int64_t j = 0; j < g.OW; ++j) d[j] = s[j * sW];
          }
    });
  }
  // Transpose: rows r = c * S + phase; the entry of output channel o at tap (kh, kw) reads table
  // slot o * KH * KW + kh * KW + kw, whose offset is o * Lrow + M - tap_offset(kh, kw).
  const int64_t R = g.C * g.S, nnz = row_ptr[g.O], KK = g.KH * g.KW;
  std::vector<int64_t> tap_row, tap_shift;
  g.tap_rows(tap_row, tap_shift);
  std::vector<int32_t> tptr(R + 1, 0);
  std::vector<int64_t> rowof(nnz);
  for (int64_t o = 0; o < g.O; ++o) {
    const int64_t base = (o / g.Og) * g.Cg * g.S;
    for (int32_t j = row_ptr[o]; j < row_ptr[o + 1]; ++j) {
      rowof[j] = base + tap_row[col[j]];
      ++tptr[rowof[j] + 1];
    }
  }
  for (int64_t r = 0; r < R; ++r) tptr[r + 1] += tptr[r];
  std::vector<int32_t> fill(tptr.begin(), tptr.end() - 1);
  std::vector<int32_t> tcol(nnz);
  std::vector<T> tval(nnz);
  for (int64_t o = 0; o < g.O; ++o) {
    for (int32_t j = row_ptr[o]; j < row_ptr[o + 1]; ++j) {
      const int32_t k = fill[rowof[j]]++;
      tcol[k] = int32_t(o * KK + col[j] % KK);
      tval[k] = val[j];
    }
  }
  std::vector<int64_t> tap(g.O * KK);
  for (int64_t o = 0; o < g.O; ++o)
    for (int64_t k = 0; k < KK; ++k) tap[o * KK + k] = o * Lrow + M - tap_shift[k];
  // Destination of grid position q of phase (a, b): padded pixel (i*sh + a, j*sw + b); the valid
  // columns of a grid row form one run with step sw in the input image.
  RunBuilder runs(length, g.S, TW);
  const int64_t HWq = g.Hq * g.Wq;
  for (int64_t s = 0; s < g.S; ++s) {
    const int64_t a = s / g.sw, bb = s % g.sw;
    // Columns j with 0 <= j * sw + bb - pw < W.
    const int64_t j0 = std::max<int64_t>(0, (g.pw - bb + g.sw - 1) / g.sw);
    const int64_t j1 = std::min<int64_t>(g.Wq, (g.W + g.pw - bb + g.sw - 1) / g.sw);
    if (j0 >= j1) continue;
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t i = 0; i < g.Hq; ++i) {
        const int64_t hh = i * g.sh + a - g.ph;
        if (hh < 0 || hh >= g.H) continue;
        runs.add(s, n * HWq + i * g.Wq + j0, j1 - j0, g.sw, n * g.C * g.H * g.W + hh * g.W + j0 * g.sw + bb - g.pw);
      }
  }
  std::vector<int64_t> base(R);
  for (int64_t r = 0; r < R; ++r) base[r] = (r / g.S) * g.H * g.W;
  RowSpmmArgs<T> a{tptr.data(), tcol.data(), tap.data(), nullptr, tval.data(), gog.const_data_ptr<T>(), length,
                   runs.runs(), runs.index(), runs.ntiles(), g.S, base.data(), nullptr, gin.mutable_data_ptr<T>(),
                   nullptr, false, cache_block<T>(g.O)};
  parallel_row_spmm(a, R);
  return gin;
}

void check_conv_input(const Tensor& input, const char* name) {
  TORCH_CHECK(input.dim() == 4, name, " must be 4-D (N, C, H, W), got ", input.dim(), " dims");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", input.scalar_type());
}

void check_bias(const std::optional<Tensor>& bias, const Tensor& input, int64_t O) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->numel() == O, "bias must have shape (", O, "), got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == input.scalar_type(), "bias dtype ", bias->scalar_type(),
              " does not match the input dtype ", input.scalar_type());
  TORCH_CHECK(bias->device() == input.device(), "bias must be on the input's device ", input.device());
}

/// Output of a convolution without input channels (weight_size[1] == 0): relu(bias + residual)
/// at every position (the kernels assume at least one tap per filter).
template <typename T>
Tensor no_tap_output(const Tensor& input, const ConvGeom& g, const Tensor& bias, const Tensor& residual, bool relu) {
  Tensor out = empty_output({g.N, g.O, g.OH, g.OW}, input.options());
  const Tensor b = bias.defined() ? bias.contiguous() : Tensor();
  const Tensor r = residual.defined() ? residual.contiguous() : Tensor();
  const T* bp = b.defined() ? b.const_data_ptr<T>() : nullptr;
  const T* rp = r.defined() ? r.const_data_ptr<T>() : nullptr;
  T* y = out.mutable_data_ptr<T>();
  const int64_t OHW = g.OH * g.OW;
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t o = 0; o < g.O; ++o) {
      const int64_t base = (n * g.O + o) * OHW;
      for (int64_t q = 0; q < OHW; ++q) {
        T v = bp ? bp[o] : T(0);
        if (rp) v += rp[base + q];
        y[base + q] = (relu && v < T(0)) ? T(0) : v;  // NaN stays NaN, as torch.relu
      }
    }
  return out;
}

void check_residual(const std::optional<Tensor>& residual, const ConvGeom& g, const Tensor& input) {
  if (!residual.has_value()) return;
  TORCH_CHECK(residual->dim() == 4 && residual->size(0) == g.N && residual->size(1) == g.O &&
                  residual->size(2) == g.OH && residual->size(3) == g.OW,
              "residual has shape ", residual->sizes(), ", expected the output shape (", g.N, ", ", g.O, ", ", g.OH,
              ", ", g.OW, ")");
  TORCH_CHECK(residual->scalar_type() == input.scalar_type(), "residual dtype ", residual->scalar_type(),
              " does not match the input dtype ", input.scalar_type());
  TORCH_CHECK(residual->device() == input.device(), "residual must be on the input's device ", input.device());
}

/// sparse_conv2d once its arguments are checked (geometry g, CSR contents, bias, residual).
Tensor sparse_conv2d_checked(const Tensor& input, const ConvGeom& g, const Tensor& values, const Tensor& row_ptr,
                             const Tensor& col_idx, const std::optional<Tensor>& bias,
                             const std::optional<Tensor>& residual, bool relu, bool max_pool) {
  const Tensor v = values.contiguous(), rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  Tensor out;
  bool pooled = false;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sparse_conv2d", [&] {
    if (g.Cg == 0) {
      out = no_tap_output<scalar_t>(input, g, bias.has_value() ? *bias : Tensor(),
                                    residual.has_value() ? *residual : Tensor(), relu);
      return;
    }
    const int32_t* r = rp.const_data_ptr<int32_t>();
    const Tensor b = bias.has_value() ? *bias : Tensor();
    // The 2x2 max pool goes into the lanes layout's store pass (the unpooled output is never
    // written); other layouts and a residual run the pool op after the convolution.
    if (max_pool && !residual.has_value()) {
      if (const int64_t units = lanes_units<scalar_t>(g, int64_t(r[g.O]))) {
        out = conv_forward_lanes<scalar_t>(input, g, r, ci.const_data_ptr<int32_t>(), v.const_data_ptr<scalar_t>(),
                                           b, Tensor(), relu, units, true);
        pooled = true;
        return;
      }
    }
    out = conv_forward<scalar_t>(input, g, r, ci.const_data_ptr<int32_t>(), v.const_data_ptr<scalar_t>(), b,
                                 residual.has_value() ? *residual : Tensor(), relu);
  });
  return (max_pool && !pooled) ? max_pool2x2_forward(out) : out;
}

Tensor sparse_conv2d_cpu(const Tensor& input, const Tensor& values, const Tensor& row_ptr,
                         const Tensor& col_idx, at::IntArrayRef weight_size, const std::optional<Tensor>& bias,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                         const std::optional<Tensor>& residual, bool relu, bool max_pool) {
  check_conv_input(input, "input");
  const ConvGeom g(input.sizes(), weight_size, stride, padding, dilation, groups);
  check_csr(values, row_ptr, col_idx, g.O, g.taps(), input);
  check_bias(bias, input, g.O);
  check_residual(residual, g, input);
  return sparse_conv2d_checked(input, g, values, row_ptr, col_idx, bias, residual, relu, max_pool);
}

Tensor sparse_conv2d_pair_cpu(const Tensor& input, const Tensor& values1, const Tensor& row_ptr1,
                              const Tensor& col_idx1, at::IntArrayRef weight_size1, const std::optional<Tensor>& bias1,
                              at::IntArrayRef stride1, at::IntArrayRef padding1, at::IntArrayRef dilation1,
                              int64_t groups1, bool relu1, const Tensor& values2, const Tensor& row_ptr2,
                              const Tensor& col_idx2, at::IntArrayRef weight_size2, const std::optional<Tensor>& bias2,
                              at::IntArrayRef stride2, at::IntArrayRef padding2, at::IntArrayRef dilation2,
                              int64_t groups2, const std::optional<Tensor>& residual, bool relu, bool max_pool,
                              const std::optional<Tensor>& shortcut_values,
                              const std::optional<Tensor>& shortcut_row_ptr,
                              const std::optional<Tensor>& shortcut_col_idx,
                              const std::optional<Tensor>& shortcut_bias) {
  check_conv_input(input, "input");
  const ConvGeom g1(input.sizes(), weight_size1, stride1, padding1, dilation1, groups1);
  check_csr(values1, row_ptr1, col_idx1, g1.O, g1.taps(), input);
  check_bias(bias1, input, g1.O);
  const int64_t mid[4] = {g1.N, g1.O, g1.OH, g1.OW};
  const ConvGeom g2(mid, weight_size2, stride2, padding2, dilation2, groups2);
  check_csr(values2, row_ptr2, col_idx2, g2.O, g2.taps(), input);
  check_bias(bias2, input, g2.O);
  check_residual(residual, g2, input);
  // The shortcut: a 1x1 conv with conv1's stride and no padding on the input, as the residual.
  const bool shortcut = shortcut_values.has_value();
  TORCH_CHECK(shortcut == shortcut_row_ptr.has_value() && shortcut == shortcut_col_idx.has_value(),
              "shortcut_values, shortcut_row_ptr and shortcut_col_idx go together");
  TORCH_CHECK(!(shortcut && residual.has_value()), "residual and a shortcut conv exclude each other");
  const int64_t wsc[4] = {g2.O, g1.C, 1, 1}, pad0[2] = {0, 0}, dil1[2] = {1, 1};
  std::optional<ConvGeom> gs;
  if (shortcut) {
    gs.emplace(input.sizes(), wsc, stride1, pad0, dil1, 1);
    TORCH_CHECK(gs->OH == g2.OH && gs->OW == g2.OW, "the shortcut's output (", gs->OH, "x", gs->OW,
                ") must have the second conv's output size (", g2.OH, "x", g2.OW, ")");
    check_csr(*shortcut_values, *shortcut_row_ptr, *shortcut_col_idx, gs->O, gs->taps(), input);
    check_bias(shortcut_bias, input, gs->O);
  } else {
    TORCH_CHECK(!shortcut_bias.has_value(), "shortcut_bias without a shortcut conv");
  }
  Tensor out;
  if (g1.Cg > 0 && g2.Cg > 0) {
    const Tensor v1 = values1.contiguous(), r1 = row_ptr1.contiguous(), c1 = col_idx1.contiguous();
    const Tensor v2 = values2.contiguous(), r2 = row_ptr2.contiguous(), c2 = col_idx2.contiguous();
    const Tensor vs = shortcut ? shortcut_values->contiguous() : Tensor();
    const Tensor rs = shortcut ? shortcut_row_ptr->contiguous() : Tensor();
    const Tensor cs = shortcut ? shortcut_col_idx->contiguous() : Tensor();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sparse_conv2d_pair", [&] {
      out = conv_pair_lanes<scalar_t>(
          input, g1, r1.const_data_ptr<int32_t>(), c1.const_data_ptr<int32_t>(), v1.const_data_ptr<scalar_t>(),
          bias1.has_value() ? *bias1 : Tensor(), relu1, g2, r2.const_data_ptr<int32_t>(), c2.const_data_ptr<int32_t>(),
          v2.const_data_ptr<scalar_t>(), bias2.has_value() ? *bias2 : Tensor(),
          residual.has_value() ? *residual : Tensor(), relu, max_pool,
          shortcut ? rs.const_data_ptr<int32_t>() : nullptr, shortcut ? cs.const_data_ptr<int32_t>() : nullptr,
          shortcut ? vs.const_data_ptr<scalar_t>() : nullptr, shortcut_bias.has_value() ? *shortcut_bias : Tensor());
    });
  }
  if (out.defined()) return out;
  // Elsewhere the convolutions one after the other (the same values; arguments checked above).
  std::optional<Tensor> res = residual;
  if (shortcut) {
    res = sparse_conv2d_checked(input, *gs, *shortcut_values, *shortcut_row_ptr, *shortcut_col_idx, shortcut_bias,
                                std::nullopt, false, false);
  }
  const Tensor mid_out = sparse_conv2d_checked(input, g1, values1, row_ptr1, col_idx1, bias1, std::nullopt, relu1, false);
  return sparse_conv2d_checked(mid_out, g2, values2, row_ptr2, col_idx2, bias2, res, relu, max_pool);
}

Tensor sparse_conv2d_backward_input_cpu(const Tensor& grad_output, const Tensor& values, const Tensor& row_ptr,
                                        const Tensor& col_idx, at::IntArrayRef weight_size,
                                        at::IntArrayRef input_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_conv_input(grad_output, "grad_output");
  const ConvGeom g(input_size, weight_size, stride, padding, dilation, groups);
  TORCH_CHECK(grad_output.size(0) == g.N && grad_output.size(1) == g.O && grad_output.size(2) == g.OH &&
                  grad_output.size(3) == g.OW,
              "grad_output has shape ", grad_output.sizes(), ", expected (", g.N, ", ", g.O, ", ", g.OH, ", ",
              g.OW, ")");
  check_csr(values, row_ptr, col_idx, g.O, g.taps(), grad_output);
  const Tensor v = values.contiguous(), rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "sparse_conv2d_backward_input", [&] {
    out = conv_backward_input<scalar_t>(grad_output, g, rp.const_data_ptr<int32_t>(),
                                        ci.const_data_ptr<int32_t>(), v.const_data_ptr<scalar_t>());
  });
  return out;
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

Tensor masked_conv2d_cpu(const Tensor& input, const Tensor& weight, const Tensor& mask,
                         const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups) {
  check_conv_input(input, "input");
  check_weight_mask(weight, mask, input);
  const ConvGeom g(input.sizes(), weight.sizes(), stride, padding, dilation, groups);
  check_bias(bias, input, g.O);
  const Tensor w = weight.contiguous(), m = mask.contiguous();
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "masked_conv2d", [&] {
    if (g.Cg == 0) {
      out = no_tap_output<scalar_t>(input, g, bias.has_value() ? *bias : Tensor(), Tensor(), false);
      return;
    }
    std::vector<int32_t> rp, col;
    std::vector<scalar_t> val;
    pack_dense<scalar_t>(w.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(), g.O, g.taps(), rp, col, val);
    out = conv_forward<scalar_t>(input, g, rp.data(), col.data(), val.data(), bias.has_value() ? *bias : Tensor());
  });
  return out;
}

Tensor masked_conv2d_backward_input_cpu(const Tensor& grad_output, const Tensor& weight, const Tensor& mask,
                                        at::IntArrayRef input_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_conv_input(grad_output, "grad_output");
  check_weight_mask(weight, mask, grad_output);
  const ConvGeom g(input_size, weight.sizes(), stride, padding, dilation, groups);
  TORCH_CHECK(grad_output.size(0) == g.N && grad_output.size(1) == g.O && grad_output.size(2) == g.OH &&
                  grad_output.size(3) == g.OW,
              "grad_output has shape ", grad_output.sizes(), ", expected (", g.N, ", ", g.O, ", ", g.OH, ", ",
              g.OW, ")");
  const Tensor w = weight.contiguous(), m = mask.contiguous();
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "masked_conv2d_backward_input", [&] {
    std::vector<int32_t> rp, col;
    std::vector<scalar_t> val;
    pack_dense<scalar_t>(w.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(), g.O, g.taps(), rp, col, val);
    out = conv_backward_input<scalar_t>(grad_output, g, rp.data(), col.data(), val.data());
  });
  return out;
}

/// y[b, r] = init[r] + sum_j val[j] * x[b, col[j]] with rows r of the CSR; x given as (B, K)
/// with any strides, y written to (B, R) row-major.
template <typename T>
void linear_rows(const Tensor& x, int64_t R, const int32_t* row_ptr, const int32_t* col, const T* val,
                 const T* init, T* y) {
  const int64_t B = x.size(0), K = x.size(1);
  const int64_t VW = kernel::vector_width<T>(), TW = kernel::tile_width<T>();
  const int64_t length = round_up(B, VW);
  // Transposed input: feature k holds the batch contiguously.
  Tensor xt = empty_output({K * length + TW}, x.options());  // per-call scratch: reused through the pool
  T* d = xt.mutable_data_ptr<T>();
  const T* s = x.const_data_ptr<T>();
  const int64_t sB = x.stride(0), sK = x.stride(1);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t b = 0; b < B; ++b) d[k * length + b] = s[b * sB + k * sK];
    std::fill(d + k * length + B, d + (k + 1) * length, T(0));
  }
  std::fill(d + K * length, d + K * length + TW, T(0));
  RunBuilder runs(length, 1, TW);
  runs.add(0, 0, B, R, 0);  // output (b, r) at b * R + r
  std::vector<int64_t> base(R);
  for (int64_t r = 0; r < R; ++r) base[r] = r;
  // No tap table: feature k's batch strip starts at k * length (tap_stride below).
  RowSpmmArgs<T> a{row_ptr, col, nullptr, nullptr, val, d, length, runs.runs(), runs.index(), runs.ntiles(), 1,
                   base.data(), init, y, nullptr, false, cache_block<T>(K)};
  a.tap_stride = length;
  parallel_row_spmm(a, R);
}

Tensor sparse_linear_cpu(const Tensor& input, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                         int64_t in_features, const std::optional<Tensor>& bias) {
  TORCH_CHECK(input.dim() >= 1, "input must have at least 1 dim");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "input must be float32 or float64, got ", input.scalar_type());
  TORCH_CHECK(input.size(-1) == in_features, "input has ", input.size(-1), " features, expected in_features = ",
              in_features);
  TORCH_CHECK(in_features >= 0, "in_features must be non-negative, got ", in_features);
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1, "row_ptr must be a 1-D tensor of out_features + 1 >= 1 ",
              "entries, got shape ", row_ptr.sizes());
  const int64_t R = row_ptr.numel() - 1;
  check_csr(values, row_ptr, col_idx, R, in_features, input);
  check_bias(bias, input, R);
  std::vector<int64_t> out_size(input.sizes().begin(), input.sizes().end());
  out_size.back() = R;
  Tensor out = empty_output(out_size, input.options());
  if (out.numel() == 0) return out;
  const int64_t B = out.numel() / R;  // rows of the input, counted without reshape(-1, 0)
  if (in_features == 0) {  // no input features: the output is the bias
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sparse_linear", [&] {
      scalar_t* y = out.mutable_data_ptr<scalar_t>();
      const Tensor bc = bias.has_value() ? bias->contiguous() : Tensor();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t r = 0; r < R; ++r) y[b * R + r] = bc.defined() ? bc.const_data_ptr<scalar_t>()[r] : scalar_t(0);
    });
    return out;
  }
  const Tensor x = input.reshape({B, in_features});
  const Tensor v = values.contiguous(), rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sparse_linear", [&] {
    linear_rows<scalar_t>(x, R, rp.const_data_ptr<int32_t>(), ci.const_data_ptr<int32_t>(),
                          v.const_data_ptr<scalar_t>(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                          out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

Tensor sparse_linear_backward_input_cpu(const Tensor& grad_output, const Tensor& values, const Tensor& row_ptr,
                                        const Tensor& col_idx, int64_t in_features) {
  TORCH_CHECK(grad_output.dim() >= 1, "grad_output must have at least 1 dim");
  TORCH_CHECK(grad_output.scalar_type() == at::kFloat || grad_output.scalar_type() == at::kDouble,
              "grad_output must be float32 or float64, got ", grad_output.scalar_type());
  TORCH_CHECK(in_features >= 0, "in_features must be non-negative, got ", in_features);
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1, "row_ptr must be a 1-D tensor of out_features + 1 >= 1 ",
              "entries, got shape ", row_ptr.sizes());
  const int64_t R = row_ptr.numel() - 1;
  TORCH_CHECK(grad_output.size(-1) == R, "grad_output has ", grad_output.size(-1), " features, expected ", R);
  check_csr(values, row_ptr, col_idx, R, in_features, grad_output);
  std::vector<int64_t> in_size(grad_output.sizes().begin(), grad_output.sizes().end());
  in_size.back() = in_features;
  if (R == 0) return at::zeros(in_size, grad_output.options());  // no output features: zero gradient
  Tensor gin = at::empty(in_size, grad_output.options());
  if (gin.numel() == 0) return gin;
  const Tensor gy = grad_output.reshape({gin.numel() / in_features, R});
  const Tensor v = values.contiguous(), rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "sparse_linear_backward_input", [&] {
    // CSC of the weight = CSR of its transpose (rows = input features).
    const int32_t* r = rp.const_data_ptr<int32_t>();
    const int32_t* c = ci.const_data_ptr<int32_t>();
    const scalar_t* vv = v.const_data_ptr<scalar_t>();
    const int64_t nnz = r[R];
    std::vector<int32_t> tptr(in_features + 1, 0), tcol(nnz);
    std::vector<scalar_t> tval(nnz);
    for (int64_t j = 0; j < nnz; ++j) ++tptr[c[j] + 1];
    for (int64_t k = 0; k < in_features; ++k) tptr[k + 1] += tptr[k];
    std::vector<int32_t> fill(tptr.begin(), tptr.end() - 1);
    for (int64_t o = 0; o < R; ++o)
      for (int32_t j = r[o]; j < r[o + 1]; ++j) {
        const int32_t k = fill[c[j]]++;
        tcol[k] = int32_t(o);
        tval[k] = vv[j];
      }
    linear_rows<scalar_t>(gy, in_features, tptr.data(), tcol.data(), tval.data(), nullptr,
                          gin.mutable_data_ptr<scalar_t>());
  });
  return gin;
}

}  // namespace

TORCH_LIBRARY_IMPL(apb_sparse, CPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cpu);
  m.impl("sparse_conv2d_pair", &sparse_conv2d_pair_cpu);
  m.impl("sparse_conv2d_backward_input", &sparse_conv2d_backward_input_cpu);
  m.impl("masked_conv2d", &masked_conv2d_cpu);
  m.impl("masked_conv2d_backward_input", &masked_conv2d_backward_input_cpu);
  m.impl("sparse_linear", &sparse_linear_cpu);
  m.impl("sparse_linear_backward_input", &sparse_linear_backward_input_cpu);
}

namespace kernel {

static std::atomic<int64_t> g_output_cache_bytes{int64_t(256) << 20};

int64_t output_cache_bytes() { return g_output_cache_bytes.load(std::memory_order_relaxed); }

int64_t set_output_cache_bytes(int64_t bytes) {
  const int64_t prev = g_output_cache_bytes.exchange(bytes < 0 ? 0 : bytes);
  OutputPool::get().trim(bytes < 0 ? 0 : bytes);
  return prev;
}

}  // namespace kernel

}  // namespace apb_sparse
