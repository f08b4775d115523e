"""CI smoke test of benchmarks/peers.py: one tiny case with the engines this environment has
(torch and apb_sparse); an engine whose Python is missing must be skipped with a message."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_peers_tiny_case(tmp_path):
    pytest.importorskip("apb_sparse._C")
    out = tmp_path / "peers.json"
    env = dict(os.environ)
    root = os.path.dirname(HERE)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, os.path.join(HERE, "peers.py"), "--engines", "torch", "apb_sparse", "deepsparse",
           "--deepsparse-python", str(tmp_path / "no_such_venv" / "python"), "--archs", "resnet18", "--width", "8",
           "--masks", "local@0.9", "--batches", "2", "--rounds", "2", "--warmup", "0", "--min-time", "0",
           "--gemm-n", "256", "--threads", "1", "--per-layer", "--profile-iterations", "2", "--tune",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipping deepsparse" in proc.stdout
    data = json.loads(out.read_text())
    assert "deepsparse" in data["skipped_engines"]
    assert data["gemm_gflops"] > 0
    (row,) = data["results"]
    assert 0 < row["nonzero_macs"] < 0.2 * row["dense_macs"]
    assert row["engines"]["apb_sparse"]["note"] == "apb_sparse.deploy(model, x, tune=True)"
    for engine in ("torch", "apb_sparse"):
        e = row["engines"][engine]
        assert e["max_abs_err"] < 1e-3
        assert len(e["times_ms"]) == 2 and e["median_ms"] > 0
    # per-layer times of our deployed form and of torch: every conv / linear layer of ResNet-18
    # (20 convs + fc), the deployed form's conv pairs counting two or three
    for engine in ("torch", "apb_sparse"):
        layers = row["engines"][engine]["layers"]
        assert sum(lay["layers"] for lay in layers) == 21 and all(lay["ms"] > 0 for lay in layers)
    assert len(row["engines"]["torch"]["layers"]) == 21
    assert "| resnet18 | local@0.9 | 2 |" in proc.stdout
