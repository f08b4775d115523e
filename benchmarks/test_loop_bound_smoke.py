"""CI smoke test of benchmarks/lanes_loop_bound.py: the kernel's tile loop and the generated
straight-line code for the same calls agree, on a tiny chunk (no timing is checked)."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_loop_bound_tiny(tmp_path):
    out = tmp_path / "bound.json"
    cmd = [sys.executable, os.path.join(HERE, "lanes_loop_bound.py"), "--channels", "3", "--rows", "2", "--nnz", "5",
           "--map", "6", "--reps", "1", "--passes", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode == 2 and ("no C++ compiler" in proc.stderr or "no AVX2" in proc.stderr):
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["ghz"] > 0.5
    for name in ("loop", "generated"):
        assert data[name]["gflops"] > 0 and data[name]["cycles_per_nonzero"] > 0
    assert data["generated_code_bytes"] is None or data["generated_code_bytes"] > 0


def test_loop_bound_rejects_bad_sizes():
    proc = subprocess.run([sys.executable, os.path.join(HERE, "lanes_loop_bound.py"), "--map", "2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--map" in proc.stderr
