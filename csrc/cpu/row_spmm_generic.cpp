// Portable build of the row-gather kernel (baseline ISA) and the run-time ISA switch.
//
// The portable build uses the two-unit (64-byte) accumulators of the AVX-512 build
// (APB_WIDE_VECTORS): the compiler splits them into the baseline ISA's vectors, and the code shape
// of the AVX-512 path is then tested on machines without AVX-512.
#include <atomic>

#define APB_ISA_NAMESPACE generic
#define APB_WIDE_VECTORS 1
#include "row_spmm_impl.h"
#include "lanes_impl.h"

namespace apb_sparse {
namespace kernel {

void row_spmm_generic(const RowSpmmArgs<float>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  generic::run<float>(a, r0, r1, p0, p1);
}
void row_spmm_generic(const RowSpmmArgs<double>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  generic::run<double>(a, r0, r1, p0, p1);
}
void lanes_generic(const LanesArgs<float>& a, int64_t r0, int64_t r1) { generic::lanes_run<float>(a, r0, r1); }
void lanes_generic(const LanesArgs<double>& a, int64_t r0, int64_t r1) { generic::lanes_run<double>(a, r0, r1); }
void lanes_fill_generic(const LanesFill<float>& f, int64_t c0, int64_t c1) { generic::lanes_fill_run<float>(f, c0, c1); }
void lanes_store_generic(const LanesStore<float>& s, int64_t k0, int64_t k1) { generic::lanes_store_run<float>(s, k0, k1); }
void lanes_fill_generic(const LanesFill<double>& f, int64_t c0, int64_t c1) { generic::lanes_fill_run<double>(f, c0, c1); }
void lanes_store_generic(const LanesStore<double>& s, int64_t k0, int64_t k1) { generic::lanes_store_run<double>(s, k0, k1); }

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  // libgcc's CPU model also checks that the OS saves the zmm state (XGETBV), not only CPUID.
  static const bool has = cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw");
  return has;
#else
  return false;
#endif
}

Isa best_isa() {
  static const Isa best = cpu_has_avx512() ? kAvx512 : cpu_has_avx2_fma() ? kAvx2 : kGeneric;
  return best;
}

static std::atomic<int> g_max_isa{kAvx512};

Isa active_isa() {
  const int cap = g_max_isa.load(std::memory_order_relaxed);
  const Isa best = best_isa();
  return cap < best ? Isa(cap) : best;
}

Isa set_max_isa(Isa cap) {
  const Isa prev = active_isa();
  g_max_isa.store(cap);
  return prev;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "generic";
  }
}

static std::atomic<bool> g_row_tiles{true};

bool set_row_tiles(bool enable) { return g_row_tiles.exchange(enable); }
bool row_tiles_enabled() { return g_row_tiles.load(std::memory_order_relaxed); }

static std::atomic<bool> g_channel_blocking{true};

bool set_channel_blocking(bool enable) { return g_channel_blocking.exchange(enable); }
bool channel_blocking_enabled() { return g_channel_blocking.load(std::memory_order_relaxed); }

static std::atomic<int64_t> g_min_parallel_work{int64_t(1) << 18};

int64_t set_min_parallel_work(int64_t work) { return g_min_parallel_work.exchange(work < 0 ? 0 : work); }
int64_t min_parallel_work() { return g_min_parallel_work.load(std::memory_order_relaxed); }

static std::atomic<int> g_shifted_layout{1};

int set_shifted_layout(int mode) { return g_shifted_layout.exchange(mode < 0 ? 0 : mode > 2 ? 2 : mode); }
int shifted_layout() { return g_shifted_layout.load(std::memory_order_relaxed); }

static std::atomic<bool> g_lanes{true};

bool set_lanes(bool enable) { return g_lanes.exchange(enable); }
bool lanes_enabled() { return g_lanes.load(std::memory_order_relaxed); }

static std::atomic<bool> g_lanes_tiles{true};

bool set_lanes_tiles(bool enable) { return g_lanes_tiles.exchange(enable); }
bool lanes_tiles_enabled() { return g_lanes_tiles.load(std::memory_order_relaxed); }

static std::atomic<bool> g_lanes_blocks_inner{true};

bool set_lanes_blocks_inner(bool enable) { return g_lanes_blocks_inner.exchange(enable); }
bool lanes_blocks_inner() { return g_lanes_blocks_inner.load(std::memory_order_relaxed); }

}  // namespace kernel
}  // namespace apb_sparse
