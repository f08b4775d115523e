#!/usr/bin/env bash
# One GPU session for apb_sparse: build, CUDA tests, compute-sanitizer, pipeline smoke, latency.
#
#   bash benchmarks/gpu_session.sh prepare            # on the CPU machine, once, before the calls
#   bash benchmarks/gpu_session.sh PHASE [PHASE ...]  # on the GPU machine; PHASE in
#                                                     #   build tests sanitize smoke latency (or all)
#
# "prepare" copies the pure-Python packages the GPU image lacks (pyautoattack without its bundled
# checkpoint, secml-torch: about 2.5 MB) from this machine's site-packages into .gpu_site/, which
# it adds to git's exclude list; every GPU call must carry it: carry=[".gpu_site"].
# Suggested device calls (the phase caps below keep each under the 10-minute limit; the second
# finds the first one's build on the still-warm machine, so issue it right away):
#   run(command="bash benchmarks/gpu_session.sh build tests", carry=[".gpu_site"], timeout_s=600)
#   run(command="bash benchmarks/gpu_session.sh sanitize smoke latency", carry=[".gpu_site"], timeout_s=600)
# If the machine went cold in between, start the second with "build" again.
#
# Everything lands in $OUT (at most 8 files come back): summary.txt, build.log, cuda_tests.txt,
# sanitize.txt, smoke.log, smoke_run.tar.gz, latency.log, latency_cuda.json.  The test log and the
# latency JSON are also written to benchmarks/results/ (cuda_tests.txt, latency_cuda.json).
# Each phase runs under its own time cap (env TIMEOUT_<PHASE>, seconds) and a failing phase does
# not stop the next; summary.txt has each phase's exit status and duration.  The estimated phase
# times below are guesses (nothing here has run on a GPU yet): build 2-4 min, tests 1-3,
# sanitize 2-3, smoke 2-3, latency 1-3.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export OUT="${OUT:-/tmp/apb_gpu_out}"
mkdir -p "$OUT" benchmarks/results
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"

prepare() {
  local site dst exclude
  site="$(python -c 'import pyautoattack, os; print(os.path.dirname(os.path.dirname(pyautoattack.__file__)))')" || {
    echo "prepare: pyautoattack is not installed here (pip install pyautoattack secml-torch)" >&2; return 1; }
  python -c 'import secmlt' || { echo "prepare: secml-torch is not installed here" >&2; return 1; }
  dst="$ROOT/.gpu_site"
  rm -rf "$dst"
  mkdir -p "$dst"
  # Pure Python, so the copies run under the GPU image's Python 3.12 too; the checkpoint of
  # pyautoattack's examples (42 MB) is not needed.
  (cd "$site" && tar cf - --exclude=__pycache__ --exclude=examples pyautoattack secmlt) | (cd "$dst" && tar xf -)
  exclude="$(git rev-parse --git-common-dir)/info/exclude"
  mkdir -p "$(dirname "$exclude")"
  grep -qxF '/.gpu_site/' "$exclude" 2>/dev/null || echo '/.gpu_site/' >> "$exclude"
  git check-ignore -q "$dst" || { echo "prepare: .gpu_site is not ignored by git" >&2; return 1; }
  du -sh "$dst"
  echo "prepare: done; carry .gpu_site in every GPU call"
}

phase_build() {
  {
    echo "== $(date -u +%FT%TZ) build on $(hostname)"
    nvidia-smi -L || true
    nvcc --version | tail -2 || true
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0))'
    git log -1 --oneline 2>/dev/null || true
    # One target, the GPU's own (Hopper); setup.py's default list is for portable builds.
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
      "$PY" -m pip install --no-build-isolation --no-deps -e . || return 1
    "$PY" - <<'EOF' || return 1
import torch
import apb_sparse.ops as ops
assert ops.available(), "apb_sparse._C did not load"
assert getattr(ops._C, "cuda_built", 0) == 1, "apb_sparse was built without CUDA kernels"
assert torch._C._dispatch_has_kernel_for_dispatch_key("apb_sparse::sparse_conv2d", "CUDA")
x = torch.randn(1, 2, 5, 5, device="cuda")
w = torch.randn(3, 2, 3, 3, device="cuda")
v, rp, ci = ops.pack_csr(w)
err = (ops.sparse_conv2d(x, v, rp, ci, w.shape, None, 1, 1) - torch.nn.functional.conv2d(x, w, None, 1, 1)).abs().max()
print("build check: cuda_built == 1, a first sparse_conv2d on", torch.cuda.get_device_name(0), "max error", float(err))
assert float(err) < 1e-3
EOF
  } > "$OUT/build.log" 2>&1
}

phase_tests() {
  local log="benchmarks/results/cuda_tests.txt"
  {
    echo "# CUDA test run: $(date -u +%FT%TZ), $(git log -1 --oneline 2>/dev/null)"
    "$PY" -c 'import torch; print("# torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.get_device_name(0))'
    echo "# command: $PY -m pytest tests/test_cuda.py tests/test_ops.py tests/test_nn.py -k cuda -rA"
    "$PY" -m pytest tests/test_cuda.py tests/test_ops.py tests/test_nn.py -k cuda -rA -p no:cacheprovider
  } > "$log" 2>&1
  local rc=$?
  cp "$log" "$OUT/cuda_tests.txt"
  return $rc
}

phase_sanitize() {
  local cs rc=0
  cs="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
  {
    echo "== $(date -u +%FT%TZ) $cs"
    # Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an
    # access past a tensor's end instead of landing inside a larger cached block.
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    echo "== memcheck"
    timeout "${TIMEOUT_MEMCHECK:-110}" "$cs" --tool memcheck --error-exitcode 3 "$PY" benchmarks/cuda_sanitize.py
    echo "memcheck exit status: $?"
    echo "== racecheck (shared memory hazards; --quick)"
    timeout "${TIMEOUT_RACECHECK:-80}" "$cs" --tool racecheck --error-exitcode 3 "$PY" benchmarks/cuda_sanitize.py --quick
    echo "racecheck exit status: $?"
  } > "$OUT/sanitize.txt" 2>&1
  grep -q "^memcheck exit status: 0$" "$OUT/sanitize.txt" || rc=1
  grep -q "^racecheck exit status: 0$" "$OUT/sanitize.txt" || rc=1
  return $rc
}

phase_smoke() {
  # The paper preset's pipeline (what `apb run --preset paper --device cuda` runs), narrowed to
  # ResNet-18, 2 methods, 1 sparsity and 1 epoch per phase on the synthetic CIFAR-shaped data.
  # Called through run_benchmark because the CLI has no flags for the prune / finetune epochs.
  local run=/tmp/apb_gpu_smoke_run
  rm -rf "$run"
  "$PY" - "$run" > "$OUT/smoke.log" 2>&1 <<'EOF'
import json
import sys
import time
from pathlib import Path

from apb_sparse.bench.presets import get_preset
from apb_sparse.bench.runner import run_benchmark

out = Path(sys.argv[1])
preset = get_preset("paper").with_overrides(
    base_epochs=1, prune_epochs=1, finetune_epochs=1, train_subset=1024, aa_samples=64, fmn_samples=16,
    fmn_steps=20, check_samples=16, square_queries=100, latency_rounds=3, device="cuda")
print("SYNTHETIC DATA (synthetic-cifar10): a smoke test of the pipeline on a GPU, not a result")
t0 = time.perf_counter()
summary = run_benchmark(preset, out, methods=["lwm_local", "hydra"], structures=["unstructured"],
                        sparsities={"unstructured": [0.9]}, seeds=[0], archs=["resnet18"],
                        datasets=["synthetic-cifar10"], device="cuda", progress=False, latency=True, plots=False)
print("summary:", summary)
print(f"smoke run took {time.perf_counter() - t0:.0f} s")
rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
assert rows, "no result records"
assert all(r.get("dataset") == "synthetic-cifar10" for r in rows), "records must name the synthetic dataset"
print("record fields:", sorted(rows[0]))
for r in rows:
    print({k: v for k, v in r.items() if not isinstance(v, (dict, list))})
EOF
  local rc=$?
  [ -d "$run" ] && tar czf "$OUT/smoke_run.tar.gz" --exclude='*.safetensors' --exclude='*.pt' -C /tmp apb_gpu_smoke_run
  return $rc
}

phase_latency() {
  "$PY" benchmarks/latency_cuda.py --out "$OUT/latency_cuda.json" > "$OUT/latency.log" 2>&1
  local rc=$?
  [ -f "$OUT/latency_cuda.json" ] && cp "$OUT/latency_cuda.json" benchmarks/results/latency_cuda.json
  return $rc
}

run_phase() {
  local name="$1" cap t0 rc
  cap="$(eval echo "\${TIMEOUT_${name^^}:-$2}")"
  t0=$(date +%s)
  echo "== phase $name (cap ${cap} s) $(date -u +%TZ)"
  # Functions cannot run under timeout(1) directly: run this script again for the one phase.
  timeout --kill-after=10 "$cap" bash "$ROOT/benchmarks/gpu_session.sh" "_$name"
  rc=$?
  [ $rc -eq 124 ] && echo "phase $name: TIMED OUT after ${cap} s"
  printf '%-9s exit %3d  %4d s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" | tee -a "$SUMMARY"
}

if [ $# -eq 0 ]; then
  sed -n '2,25p' "$0"
  exit 2
fi
case "$1" in
  prepare) prepare; exit $? ;;
  _build) phase_build; exit $? ;;
  _tests) phase_tests; exit $? ;;
  _sanitize) phase_sanitize; exit $? ;;
  _smoke) phase_smoke; exit $? ;;
  _latency) phase_latency; exit $? ;;
esac
phases=("$@")
[ "${phases[*]}" = "all" ] && phases=(build tests sanitize smoke latency)
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_session: error: no CUDA GPU visible to $PY (torch.cuda.is_available() is False)" | tee -a "$SUMMARY" >&2
  exit 2
fi
for p in "${phases[@]}"; do
  case "$p" in
    build) run_phase build 330 ;;
    tests) run_phase tests 240 ;;
    sanitize) run_phase sanitize 200 ;;
    smoke) run_phase smoke 240 ;;
    latency) run_phase latency 150 ;;
    *) echo "gpu_session: unknown phase $p (build tests sanitize smoke latency all)" >&2; exit 2 ;;
  esac
done
echo "== summary ($OUT)"
cat "$SUMMARY"
tail -n 15 "$OUT/cuda_tests.txt" 2>/dev/null | grep -E "passed|failed|error" || true
grep -E "ERROR SUMMARY|exit status" "$OUT/sanitize.txt" 2>/dev/null || true
tail -n 20 "$OUT/latency.log" 2>/dev/null | grep -E "^\|" || true
