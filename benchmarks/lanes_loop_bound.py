"""How close the lanes kernel's inner loop runs to this core's limit, and what code generated per
layer would change: a stand-alone C++ harness, built here with g++ (AVX2 + FMA), one thread.

Two ways to run the same tile calls of one synthetic chunk (``--channels`` input channels of a
padded ``--map`` x ``--map`` map, 8 images per vector, ``--rows`` output channels with ``--nnz``
nonzeros each at random channels and 3x3 taps, every 3-row x 4-pixel tile of the map):

* ``loop``: the project's kernel, ``lanes_tile`` from csrc/cpu/lanes_impl.h (its AVX2 build): per
  nonzero one 32-bit offset load, one weight broadcast and 12 vector FMAs with memory operands;
* ``generated``: the same calls as straight-line code written for these nonzeros (the offsets as
  immediate displacements, no loop, no offset loads): what a per-layer code generator (xbyak,
  asmjit, LLVM) would emit for this schedule.  Both results are checked equal before timing.

It also measures the core clock (a chain of dependent integer adds) and reports cycles per nonzero
against the loop's load bound: 13 32-byte loads per nonzero at two per cycle, 6.5 cycles.

    python benchmarks/lanes_loop_bound.py                       # 24 channels, 24 nonzeros per call
    python benchmarks/lanes_loop_bound.py --rows 8 --nnz 24     # generated code small enough for L1i
    python benchmarks/lanes_loop_bound.py --channels 128        # a window that outgrows L1

Needs g++ and an AVX2 + FMA CPU; otherwise it says so and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc", "cpu")
LANES = 8  # images per 32-byte vector (float)

HARNESS = r"""
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#define APB_ISA_NAMESPACE avx2
#include "row_spmm_impl.h"
#include "lanes_impl.h"
#include "schedule.h"  // ROWS, NNZ, CHANNELS, WP, PLANE, TILE_ROWS, OUT_W, PIX, OFF[], generated()

using apb_sparse::kernel::avx2::lanes_tile;

static double clock_ghz() {
  const long n = 400000000L;
  long x = 0;
  auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; i += 8)
    __asm__ volatile("add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0\n add $1,%0"
                     : "+r"(x));
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return x / s / 1e9;
}

static void pass(int mode, const float* src, const float* val, float* dst) {
  for (int64_t i = 0; i < TILE_ROWS; i += 3)
    for (int64_t j = 0; j < OUT_W; j += 4) {
      const int64_t out[3] = {i * OUT_W + j, (i + 1) * OUT_W + j, (i + 2) * OUT_W + j};
      const int64_t seg[3] = {(i * WP + j) * 8, ((i + 1) * WP + j) * 8, ((i + 2) * WP + j) * 8};
      if (mode == 0) {
        for (int r = 0; r < ROWS; ++r)
          lanes_tile<float>(OFF + r * NNZ, val + r * NNZ, NNZ, src, seg, out, 0.f, dst + int64_t(r) * PIX * 8, false,
                            false);
      } else {
        generated(src, val, dst, seg, out);
      }
    }
}

int main(int argc, char** argv) {
  const int reps = atoi(argv[1]), passes = atoi(argv[2]);
  float* src = static_cast<float*>(std::aligned_alloc(64, (CHANNELS * PLANE + 64) * 4));
  float* val = static_cast<float*>(std::aligned_alloc(64, (ROWS * NNZ + 16) * 4));
  const int64_t dn = int64_t(ROWS) * PIX * 8;
  float* dst[2];
  for (int m = 0; m < 2; ++m) {
    dst[m] = static_cast<float*>(std::aligned_alloc(64, (dn + 64) * 4));
    std::memset(dst[m], 0, dn * 4);
  }
  uint32_t s = 12345;
  for (int64_t i = 0; i < CHANNELS * PLANE + 64; ++i) src[i] = ((s = s * 1664525u + 1013904223u) >> 9) * 1e-7f - 0.8f;
  for (int i = 0; i < ROWS * NNZ + 16; ++i) val[i] = ((s = s * 1664525u + 1013904223u) >> 9) * 1e-9f;
  pass(0, src, val, dst[0]);
  pass(1, src, val, dst[1]);
  double diff = 0, mag = 0;
  for (int64_t i = 0; i < dn; ++i) {
    diff = std::max(diff, double(std::fabs(dst[0][i] - dst[1][i])));
    mag = std::max(mag, double(std::fabs(dst[0][i])));
  }
  double best[2] = {1e30, 1e30};
  for (int r = 0; r < reps; ++r)
    for (int m = 0; m < 2; ++m) {
      auto t0 = std::chrono::steady_clock::now();
      for (int p = 0; p < passes; ++p) pass(m, src, val, dst[m]);
      best[m] = std::min(best[m], std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  const double nonzeros = double(ROWS) * NNZ * (TILE_ROWS / 3) * (OUT_W / 4) * passes;
  std::printf("{\"ghz\": %.4f, \"loop_s\": %.6e, \"generated_s\": %.6e, \"nonzeros\": %.0f, \"max_diff\": %.3e, "
              "\"max_abs\": %.3e}\n", clock_ghz(), best[0], best[1], nonzeros, diff, mag);
  return 0;
}
"""


def schedule(channels: int, rows: int, nnz: int, map_size: int, seed: int) -> str:
    """schedule.h: the chunk's geometry, every row's sorted source offsets (random channel and
    3x3 tap per nonzero) and the generated straight-line code for one tile of every row."""
    rng = random.Random(seed)
    wp = map_size + 2
    plane = wp * wp * LANES
    offs = []
    for _ in range(rows):
        offs.append(sorted(rng.randrange(channels) * plane + (t // 3 * wp + t % 3) * LANES
                           for t in (rng.randrange(9) for _ in range(nnz))))
    tile_rows = map_size // 3 * 3
    lines = [
        f"constexpr int ROWS = {rows}, NNZ = {nnz}, CHANNELS = {channels};",
        f"constexpr int64_t WP = {wp}, PLANE = {plane}, TILE_ROWS = {tile_rows}, OUT_W = {map_size - map_size % 4},"
        f" PIX = {map_size * map_size};",
        "static const int32_t OFF[] = {" + ",".join(str(o) for row in offs for o in row) + "};",
        "typedef float V8 __attribute__((vector_size(32)));",
        "static inline V8 ld8(const float* p) { V8 v; std::memcpy(&v, p, 32); return v; }",
        "static inline void st8(float* p, V8 v) { std::memcpy(p, &v, 32); }",
        "__attribute__((noinline)) void generated(const float* src, const float* val, float* dst,"
        " const int64_t (&seg)[3], const int64_t (&out)[3]) {",
        "  const float* s0 = src + seg[0]; const float* s1 = src + seg[1]; const float* s2 = src + seg[2];",
        '  asm("" : "+r"(s0), "+r"(s1), "+r"(s2));',
    ]
    j = 0
    for r, row in enumerate(offs):
        lines.append(f"  {{ float* d[3] = {{dst + ({r} * PIX + out[0]) * 8, dst + ({r} * PIX + out[1]) * 8,"
                     f" dst + ({r} * PIX + out[2]) * 8}}; V8 a0[4], a1[4], a2[4];")
        lines.append("    for (int p = 0; p < 4; ++p) { a0[p] = ld8(d[0] + p * 8); a1[p] = ld8(d[1] + p * 8);"
                     " a2[p] = ld8(d[2] + p * 8); }")
        for o in row:
            lines.append(f"    {{ const V8 w = val[{j}] - V8{{}}; for (int p = 0; p < 4; ++p) {{"
                         f" a0[p] += w * ld8(s0 + {o} + p * 8); a1[p] += w * ld8(s1 + {o} + p * 8);"
                         f" a2[p] += w * ld8(s2 + {o} + p * 8); }} }}")
            j += 1
        lines.append("    for (int p = 0; p < 4; ++p) { st8(d[0] + p * 8, a0[p]); st8(d[1] + p * 8, a1[p]);"
                     " st8(d[2] + p * 8, a2[p]); } }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, default=24, help="input channels in the chunk (24: the window fits L1)")
    p.add_argument("--rows", type=int, default=32, help="output channels")
    p.add_argument("--nnz", type=int, default=24, help="nonzeros per output channel (per call)")
    p.add_argument("--map", type=int, default=16, help="output map size (padded by 1 on each side)")
    p.add_argument("--reps", type=int, default=9, help="timed repetitions per variant (alternating); best is kept")
    p.add_argument("--passes", type=int, default=50, help="passes over the map per repetition")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cxx", default=os.environ.get("CXX", "g++"))
    p.add_argument("--json", help="also write the result as JSON to this file")
    a = p.parse_args(argv)
    for name in ("channels", "rows", "nnz", "reps", "passes"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    if a.map < 4:
        p.error("--map must be at least 4 (one tile of 3 rows x 4 pixels)")
    if shutil.which(a.cxx) is None:
        print(f"lanes_loop_bound: no C++ compiler {a.cxx!r}", file=sys.stderr)
        return 2
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    if not (" avx2" in flags and " fma" in flags):
        print("lanes_loop_bound: this CPU has no AVX2 + FMA", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "schedule.h"), "w") as f:
            f.write(schedule(a.channels, a.rows, a.nnz, a.map, a.seed))
        with open(os.path.join(tmp, "harness.cpp"), "w") as f:
            f.write(HARNESS)
        exe = os.path.join(tmp, "harness")
        subprocess.run([a.cxx, "-O3", "-std=c++17", "-mavx2", "-mfma", "-mtune=haswell", "-I", CSRC, "-I", tmp,
                        os.path.join(tmp, "harness.cpp"), "-o", exe], check=True)
        nm = subprocess.run(["nm", "-S", "-C", exe], capture_output=True, text=True).stdout if shutil.which("nm") else ""
        code_bytes = next((int(line.split()[1], 16) for line in nm.splitlines() if " generated(" in line), None)
        res = json.loads(subprocess.run([exe, str(a.reps), str(a.passes)], capture_output=True, text=True,
                                        check=True).stdout)
    if res["max_diff"] > 1e-5 * max(1.0, res["max_abs"]):
        print(f"lanes_loop_bound: the generated code's result differs from the kernel's by {res['max_diff']:.3g}",
              file=sys.stderr)
        return 1
    peak = 2 * 8 * 2 * res["ghz"]  # two 8-lane FMA pipes, GFLOP/s per core
    print(f"core clock {res['ghz']:.2f} GHz, FMA peak {peak:.0f} GFLOP/s per core; {a.channels} channels of a "
          f"{a.map}x{a.map} map, {a.rows} output channels x {a.nnz} nonzeros; generated code "
          f"{code_bytes if code_bytes is not None else '?'} bytes")
    out = dict(vars(a), ghz=res["ghz"], generated_code_bytes=code_bytes)
    for name in ("loop", "generated"):
        s = res[f"{name}_s"]
        gflops = res["nonzeros"] * 12 * LANES * 2 / s / 1e9
        cycles = s * res["ghz"] * 1e9 / res["nonzeros"]
        out[name] = {"gflops": gflops, "cycles_per_nonzero": cycles}
        print(f"  {name:9s} {gflops:6.1f} GFLOP/s ({100 * gflops / peak:3.0f} % of peak), {cycles:5.2f} cycles per "
              f"nonzero ({6.5 / cycles:.2f} of the 6.5-cycle load bound)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
