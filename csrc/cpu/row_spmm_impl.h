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

/// One register tile: NV vectors of consecutive positions starting at p for row r.
template <typename T, int NV>
inline void tile(const RowSpmmArgs<T>& a, int64_t r, int64_t p) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  const V init = broadcast<V, T>(a.init ? a.init[r] : T(0));
  V acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = init;
  const int32_t jb = a.row_ptr[r];
  const int32_t je = a.row_ptr[r + 1];
  const T* src = a.src + p;
  for (int32_t j = jb; j < je; ++j) {
    const V w = broadcast<V, T>(a.val[j]);
    const T* s = src + a.off[j];
    for (int v = 0; v < NV; ++v) acc[v] += w * loadu<V, T>(s + v * W);
  }
  alignas(32) T buf[NV * W];
  const bool plain = a.residual == nullptr;
  for (int v = 0; v < NV; ++v) {
    if (a.relu && plain) acc[v] = acc[v] > V{} ? acc[v] : V{};
    std::memcpy(buf + v * W, &acc[v], sizeof(V));
  }
  const int64_t* om = a.omap + (r % a.nclass) * a.length + p;
  T* d = a.dst + a.dst_base[r];
  const T* res = plain ? nullptr : a.residual + a.dst_base[r];
  // Runs of consecutive destinations (a full output row) are the common case: copy them whole.
  int t = 0;
  while (t < NV * W) {
    const int64_t o = om[t];
    if (o < 0) { ++t; continue; }
    int e = t + 1;
    while (e < NV * W && om[e] == o + (e - t)) ++e;
    if (plain) {
      std::memcpy(d + o, buf + t, sizeof(T) * (e - t));
    } else {
      for (int k = t; k < e; ++k) {
        const T y = buf[k] + res[o + (k - t)];
        d[o + (k - t)] = (a.relu && y < T(0)) ? T(0) : y;
      }
    }
    t = e;
  }
}

template <typename T>
void run(const RowSpmmArgs<T>& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  constexpr int W = Vec<T>::W;
  constexpr int TW = 8 * W;
  const int64_t block = a.block > 0 ? a.block : TW;
  for (int64_t pb = p0; pb < p1; pb += block) {
    const int64_t pe = pb + block < p1 ? pb + block : p1;
    for (int64_t r = r0; r < r1; ++r) {
      int64_t p = pb;
      for (; p + TW <= pe; p += TW) tile<T, 8>(a, r, p);
      switch ((pe - p) / W) {
        case 7: tile<T, 7>(a, r, p); break;
        case 6: tile<T, 6>(a, r, p); break;
        case 5: tile<T, 5>(a, r, p); break;
        case 4: tile<T, 4>(a, r, p); break;
        case 3: tile<T, 3>(a, r, p); break;
        case 2: tile<T, 2>(a, r, p); break;
        case 1: tile<T, 1>(a, r, p); break;
        default: break;
      }
    }
  }
}

}  // namespace APB_ISA_NAMESPACE
}  // namespace kernel
}  // namespace apb_sparse
