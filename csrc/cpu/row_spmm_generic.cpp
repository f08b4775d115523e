// Portable build of the row-gather kernel (baseline ISA) and the run-time ISA switch.
#include <atomic>

#define APB_ISA_NAMESPACE generic
#include "row_spmm_impl.h"

namespace apb_sparse {
namespace kernel {

void row_spmm_generic(const RowSpmmArgs<float>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  generic::run<float>(a, r0, r1, p0, p1);
}
void row_spmm_generic(const RowSpmmArgs<double>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  generic::run<double>(a, r0, r1, p0, p1);
}

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

static std::atomic<bool> g_force_generic{false};

bool set_force_generic(bool force) { return g_force_generic.exchange(force); }
bool force_generic() { return g_force_generic.load(std::memory_order_relaxed); }

static std::atomic<bool> g_row_tiles{true};

bool set_row_tiles(bool enable) { return g_row_tiles.exchange(enable); }
bool row_tiles_enabled() { return g_row_tiles.load(std::memory_order_relaxed); }

}  // namespace kernel
}  // namespace apb_sparse
