"""Adversarially train a small CNN and report clean / PGD / AutoAttack / FMN robustness.

Examples (the numbers in the README came from these):

    python benchmarks/robustness.py --dataset digits --epochs 20 --steps 10 --eps 0.1 \
        --aa-samples 360
    python benchmarks/robustness.py --dataset fashion-mnist --width 16 --train-subset 10000 \
        --epochs 3 --steps 3 --eps 0.1 --aa-samples 100

Writes ``benchmarks/results/robustness_<dataset>.json`` (numbers, timings, commands, environment)
and the FMN security curve ``benchmarks/results/robustness_<dataset>_security.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apb_sparse.data import get_dataset  # noqa: E402
from apb_sparse.models import get_model  # noqa: E402
from apb_sparse.robustness import evaluate  # noqa: E402
from apb_sparse.train import TrainConfig, accuracy, train  # noqa: E402


def _commit() -> str:
    # Read the checked-out commit from .git without invoking git.
    root = Path(__file__).resolve().parents[1] / ".git"
    try:
        head = (root / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = root / head[5:]
            return ref.read_text().strip() if ref.exists() else head
        return head
    except OSError:
        return "unknown"


def _env(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import pyautoattack  # noqa: F401
    from importlib.metadata import version
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "threads": threads, "cuda": torch.cuda.is_available(), "commit": _commit(),
            "pyautoattack": version("pyautoattack"), "secml-torch": version("secml-torch")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist", "mnist"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--mode", default="pgd", choices=["natural", "pgd", "trades", "fgsm"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--pgd-samples", type=int, default=1000)
    p.add_argument("--aa-samples", type=int, default=100)
    p.add_argument("--aa-version", default="standard")
    p.add_argument("--fmn-samples", type=int, default=200)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = Path(args.out or Path(__file__).parent / "results" / f"robustness_{args.dataset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
              "args": vars(args), "env": _env(args.threads)}

    data = get_dataset(args.dataset, data_dir=args.data_dir, train_subset=args.train_subset)
    torch.manual_seed(args.seed)
    c = data.input_shape[0]
    model = get_model(args.model, num_classes=data.num_classes, in_channels=c,
                      mean=data.mean, std=data.std,
                      **({"width": args.width} if args.model in ("small_cnn", "resnet18", "preact_resnet18") else {}))
    cfg = TrainConfig(mode=args.mode, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      eps=args.eps, steps=args.steps, seed=args.seed)
    t0 = time.perf_counter()
    log = train(model, data, cfg, progress=sys.stderr.isatty())
    record["train"] = {"seconds": time.perf_counter() - t0, "train_size": len(data.train),
                       "params": sum(q.numel() for q in model.parameters()), "log": log.to_dict()}
    model.eval()
    record["clean_accuracy_full_test"] = accuracy(model, data)
    print(f"trained in {record['train']['seconds']:.0f} s; clean test accuracy "
          f"{100 * record['clean_accuracy_full_test']:.2f}% on {len(data.test)} images", flush=True)

    results = {}
    r = evaluate(model, data, attack="pgd", eps=args.eps, n_samples=args.pgd_samples,
                 pgd_steps=50, pgd_restarts=1, seed=args.seed)
    results["pgd50"] = r.to_dict()
    print(r.summary(), flush=True)
    r = evaluate(model, data, attack="autoattack", version=args.aa_version, eps=args.eps,
                 n_samples=args.aa_samples, seed=args.seed, checks=False)
    results["autoattack"] = r.to_dict()
    print(r.summary(), r.per_attack, flush=True)
    png = out.with_name(out.stem + "_security.png")
    r = evaluate(model, data, attack="fmn", eps=args.eps, n_samples=args.fmn_samples,
                 seed=args.seed, checks=False, eps_grid=[0.005 * i for i in range(61)], plot=png)
    results["fmn"] = r.to_dict()
    print(r.summary(), flush=True)
    record["results"] = results
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out} and {png}")
    return record


if __name__ == "__main__":
    main()
