"""A/B: ``apb_sparse.deploy`` (this tree) against another tree's default form, interleaved.

Each side is a persistent worker process importing its own checkout of apb_sparse (the two
cannot share a process: both register ``torch.ops.apb_sparse``); the driver asks them in turn,
round by round, to time ``calls`` forward passes of the same masked model on the same input, and
reports medians and the per-round ratio.  Used to check that the explicit deployment step is at
least as fast as the old default ``sparsify(model)`` (``fuse="auto"``, commit ccf68b4)::

    git worktree add /tmp/old ccf68b4 && cp apb_sparse/_C*.so /tmp/old/apb_sparse/
    python benchmarks/deploy_ab.py --other-tree /tmp/old --other-form sparsify

Writes benchmarks/results/deploy_ab.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER = r'''
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
torch.set_flush_denormal(True)
import apb_sparse
from apb_sparse.models import get_model
form = sys.argv[1]
models = {}
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "build":
        torch.manual_seed(0)
        m = get_model(cmd["arch"]).eval()
        m = apb_sparse.apply_masks(m, apb_sparse.magnitude_masks(m, cmd["sparsity"]))
        x = torch.rand(cmd["batch"], 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            ref = m(x)
        if form == "deploy":
            fast = apb_sparse.deploy(m, x)
        else:
            fast = apb_sparse.sparsify(m).eval()
        with torch.inference_mode():
            for _ in range(3):
                out = fast(x)
        models[cmd["key"]] = (fast, x)
        print(json.dumps({"max_abs_diff": float((out - ref).abs().max())}), flush=True)
    elif cmd["op"] == "time":
        fast, x = models[cmd["key"]]
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(cmd["calls"]):
                fast(x)
            dt = (time.perf_counter() - t0) / cmd["calls"]
        print(json.dumps({"s": dt}), flush=True)
'''


def _worker(tree: str, form: str, threads: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=tree)
    return subprocess.Popen([sys.executable, "-c", WORKER, form, str(threads)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=tree)


def _ask(p: subprocess.Popen, **cmd) -> dict:
    p.stdin.write(json.dumps(cmd) + "\n")
    p.stdin.flush()
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"worker died on {cmd}")
    return json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--other-tree", required=True, help="checkout of the other apb_sparse (with its _C built)")
    ap.add_argument("--other-form", default="sparsify", choices=["sparsify", "deploy"])
    ap.add_argument("--archs", nargs="+", default=["resnet18"])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.99])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per side per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/deploy_ab.json")
    args = ap.parse_args()
    here = str(Path(__file__).resolve().parents[1])
    sides = {"deploy (this tree)": _worker(here, "deploy", args.threads),
             f"{args.other_form} ({args.other_tree})": _worker(args.other_tree, args.other_form, args.threads)}
    rows = []
    try:
        for arch in args.archs:
            for sp in args.sparsities:
                for b in args.batches:
                    key = f"{arch}-{sp}-{b}"
                    checks = {n: _ask(p, op="build", key=key, arch=arch, sparsity=sp, batch=b) for n, p in sides.items()}
                    # calls per round from a first probe of the slower side
                    probe = max(_ask(p, op="time", key=key, calls=2)["s"] for p in sides.values())
                    calls = max(2, int(args.min_time / max(probe, 1e-6)))
                    times = {n: [] for n in sides}
                    for _ in range(args.rounds):
                        for n, p in sides.items():
                            times[n].append(_ask(p, op="time", key=key, calls=calls)["s"])
                    names = list(sides)
                    ratios = [o / d for d, o in zip(times[names[0]], times[names[1]])]
                    row = {"arch": arch, "sparsity": sp, "batch": b, "calls_per_round": calls,
                           **{f"{n} ms": statistics.median(v) * 1e3 for n, v in times.items()},
                           "other / deploy (median of per-round ratios)": statistics.median(ratios),
                           "checks": checks, "times_ms": {n: [t * 1e3 for t in v] for n, v in times.items()}}
                    rows.append(row)
                    print(f"{arch} {sp:.2f} b{b}: " + ", ".join(f"{n} {row[f'{n} ms']:.2f} ms" for n in names)
                          + f"; other/deploy {row['other / deploy (median of per-round ratios)']:.2f}x", flush=True)
    finally:
        for p in sides.values():
            p.stdin.close()
            p.wait(timeout=60)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip()
    out = {"command": " ".join(sys.argv), "commit": commit, "machine": platform.processor() or platform.machine(),
           "threads": args.threads, "rounds": args.rounds, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
