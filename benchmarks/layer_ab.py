"""Single-layer A/B of two builds of apb_sparse: alternating processes, one thread (``--threads``), medians.

Each round runs one process per build (``--root`` and ``--baseline-root``, each a checkout whose
extension is built in place, e.g. ``git worktree add /tmp/base <commit>`` then
``APB_SPARSE_NO_CUDA=1 python setup.py build_ext --inplace`` there), alternating, and times
``ops.sparse_conv2d`` on ResNet-18's 3x3 layer shapes at the given batch and sparsity:

    python benchmarks/layer_ab.py --baseline-root /tmp/base --rounds 4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SHAPES = [(64, 64, 32, 1), (128, 128, 16, 1), (256, 256, 8, 1), (512, 512, 4, 1), (256, 512, 8, 2)]


def measure(root: str, batch: int, sparsity: float, min_time: float, threads: int = 1) -> dict:
    """Per-layer median ms of the build at ``root`` (run in this process)."""
    sys.path.insert(0, root)
    import time

    import torch

    import apb_sparse
    from apb_sparse import ops
    if not os.path.realpath(apb_sparse.__file__).startswith(os.path.realpath(root)):
        raise SystemExit(f"apb_sparse imported from {apb_sparse.__file__}, not from {root}")
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    out = {}
    for cin, cout, hw, stride in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(batch, cin, hw, hw)
        w = torch.randn(cout, cin, 3, 3)
        w *= (torch.rand_like(w) >= sparsity)
        v, rp, ci = ops.pack_csr(w)
        with torch.inference_mode():
            ops.sparse_conv2d(x, v, rp, ci, w.shape, None, stride, 1)
            times = []
            for _ in range(3):
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < min_time:
                    ops.sparse_conv2d(x, v, rp, ci, w.shape, None, stride, 1)
                    n += 1
                times.append((time.perf_counter() - t0) / n)
        out[f"{cin}->{cout} {hw}x{hw} s{stride}"] = statistics.median(times) * 1e3
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--root", default=here, help="the build to test (default: this checkout)")
    p.add_argument("--baseline-root", required=True, help="the build to compare with")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--min-time", type=float, default=0.15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rounds < 1 or not 0 <= a.sparsity < 1 or a.batch < 1 or a.threads < 1:
        p.error("need --rounds >= 1, --batch >= 1, --threads >= 1 and 0 <= --sparsity < 1")
    if a.worker:
        print(json.dumps(measure(a.worker, a.batch, a.sparsity, a.min_time, a.threads)))
        return 0
    runs = {"new": [], "base": []}
    for _ in range(a.rounds):
        for name, root in (("base", a.baseline_root), ("new", a.root)):
            cmd = [sys.executable, os.path.abspath(__file__), "--baseline-root", a.baseline_root, "--worker", root,
                   "--batch", str(a.batch), "--sparsity", str(a.sparsity), "--min-time", str(a.min_time),
                   "--threads", str(a.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd="/", check=True)
            runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
    for layer in runs["new"][0]:
        b = statistics.median(r[layer] for r in runs["base"])
        n = statistics.median(r[layer] for r in runs["new"])
        wins = sum(rb[layer] > rn[layer] for rb, rn in zip(runs["base"], runs["new"]))
        print(f"{layer:18s} base {b:7.2f} ms  new {n:7.2f} ms  base/new {b / n:.3f}  new faster in {wins}/{a.rounds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
