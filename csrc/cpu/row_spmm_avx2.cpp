// AVX2 + FMA build of the row-gather kernel (selected at run time by cpu_has_avx2_fma()).
#include <cstdint>
#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx2,fma,tune=haswell")
#define APB_ISA_NAMESPACE avx2
#include "row_spmm_impl.h"
#include "lanes_impl.h"

namespace apb_sparse {
namespace kernel {

void row_spmm_avx2(const RowSpmmArgs<float>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  avx2::run<float>(a, r0, r1, p0, p1);
}
void row_spmm_avx2(const RowSpmmArgs<double>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  avx2::run<double>(a, r0, r1, p0, p1);
}
void lanes_avx2(const LanesArgs<float>& a, int64_t r0, int64_t r1) { avx2::lanes_run<float>(a, r0, r1); }
void lanes_avx2(const LanesArgs<double>& a, int64_t r0, int64_t r1) { avx2::lanes_run<double>(a, r0, r1); }
void lanes_fill_avx2(const LanesFill<float>& f, int64_t c0, int64_t c1) { avx2::lanes_fill_run<float>(f, c0, c1); }
void lanes_store_avx2(const LanesStore<float>& s, int64_t k0, int64_t k1) { avx2::lanes_store_run<float>(s, k0, k1); }
void lanes_fill_avx2(const LanesFill<double>& f, int64_t c0, int64_t c1) { avx2::lanes_fill_run<double>(f, c0, c1); }
void lanes_store_avx2(const LanesStore<double>& s, int64_t k0, int64_t k1) { avx2::lanes_store_run<double>(s, k0, k1); }

}  // namespace kernel
}  // namespace apb_sparse
#pragma GCC pop_options
