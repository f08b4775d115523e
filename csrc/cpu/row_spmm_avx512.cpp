// AVX-512 build of the row-gather kernel (selected at run time by active_isa()).  Same source as
// the other builds; here the accumulators of contiguous unit pairs are 64-byte zmm vectors
// (APB_WIDE_VECTORS), and the 32 vector registers leave room for the larger tiles.
#include <cstdint>
#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi2,tune=skylake-avx512")
#define APB_ISA_NAMESPACE avx512
#define APB_WIDE_VECTORS 1
#include "row_spmm_impl.h"
#include "lanes_impl.h"

namespace apb_sparse {
namespace kernel {

void row_spmm_avx512(const RowSpmmArgs<float>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  avx512::run<float>(a, r0, r1, p0, p1);
}
void row_spmm_avx512(const RowSpmmArgs<double>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  avx512::run<double>(a, r0, r1, p0, p1);
}
void lanes_avx512(const LanesArgs<float>& a, int64_t r0, int64_t r1) { avx512::lanes_run<float>(a, r0, r1); }
void lanes_avx512(const LanesArgs<double>& a, int64_t r0, int64_t r1) { avx512::lanes_run<double>(a, r0, r1); }
void lanes_fill_avx512(const LanesFill<float>& f, int64_t c0, int64_t c1) { avx512::lanes_fill_run<float>(f, c0, c1); }
void lanes_store_avx512(const LanesStore<float>& s, int64_t k0, int64_t k1) { avx512::lanes_store_run<float>(s, k0, k1); }
void lanes_fill_avx512(const LanesFill<double>& f, int64_t c0, int64_t c1) { avx512::lanes_fill_run<double>(f, c0, c1); }
void lanes_store_avx512(const LanesStore<double>& s, int64_t k0, int64_t k1) { avx512::lanes_store_run<double>(s, k0, k1); }

}  // namespace kernel
}  // namespace apb_sparse
#pragma GCC pop_options
