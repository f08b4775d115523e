"""Clean / PGD accuracy of every pruning method on one common recipe (default: sklearn digits).

Every method gets the same architecture, data, training attack and epoch budget (see
``apb_sparse.methods.Recipe``). Pipeline-A methods start from one shared dense model that is
adversarially pretrained once (``pretrain_epochs``) and passed with ``pretrained=True``; pipeline-B
and -D methods start from scratch and spend the whole ``pretrain + prune + finetune`` budget.
Robust accuracy: PGD (Linf, ``--eval-steps`` steps, ``--restarts`` restarts) on the full test split.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/methods_digits.py                 # full grid, digits
    python benchmarks/methods_digits.py --methods hydra,lwm_local --sparsities 0.9

Writes ``benchmarks/results/methods_<dataset>.json`` (with the environment) and prints a Markdown
table.
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

from apb_sparse import methods, sparsity_report  # noqa: E402
from apb_sparse.data import get_dataset  # noqa: E402
from apb_sparse.robustness import pgd  # noqa: E402
from apb_sparse.train import train  # noqa: E402

STRUCTURED = ("radmm", "harp", "pwoa", "twinrep", "lwm_local")


def _git_commit(root: Path) -> str:
    # Read .git directly (no git subprocess): HEAD -> ref -> commit.
    try:
        head = (root / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = root / ".git" / head[5:]
            if ref.is_file():
                return ref.read_text().strip()
            packed = root / ".git" / "packed-refs"
            for line in packed.read_text().splitlines() if packed.is_file() else []:
                if line.endswith(head[5:]):
                    return line.split()[0]
            return "unknown"
        return head
    except OSError:
        return "unknown"


def _evaluate(model, x, y, eps, steps, restarts):
    model.eval()
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    xa = pgd(model, x, y, norm="Linf", eps=eps, steps=steps, restarts=restarts)
    with torch.no_grad():
        robust = float((model(xa).argmax(1) == y).float().mean())
    return clean, robust


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--pretrain-epochs", type=int, default=6)
    ap.add_argument("--prune-epochs", type=int, default=2)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--finetune-lr", type=float, default=0.05)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--methods", default=",".join(methods.available()))
    ap.add_argument("--sparsities", default="0.9,0.99")
    ap.add_argument("--structured-sparsity", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    recipe = methods.Recipe(arch=args.arch, dataset=args.dataset, eps=args.eps, steps=args.train_steps,
                            pretrain_epochs=args.pretrain_epochs, prune_epochs=args.prune_epochs,
                            finetune_epochs=args.finetune_epochs, batch_size=args.batch_size,
                            lr=args.lr, finetune_lr=args.finetune_lr, seed=args.seed)
    data = get_dataset(args.dataset)
    x, y = data.tensors("test")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = x.to(device), y.to(device)

    t0 = time.perf_counter()
    dense = recipe.build_model(data).to(device)
    train(dense, data, recipe.train_config(recipe.pretrain_epochs), progress=False)
    dense_clean, dense_robust = _evaluate(dense, x, y, args.eps, args.eval_steps, args.restarts)
    rows = [{"method": "dense (pretrained)", "structure": "-", "sparsity": 0.0,
             "clean": dense_clean, "pgd": dense_robust, "seconds": time.perf_counter() - t0}]
    print(f"dense: clean {dense_clean:.3f} pgd {dense_robust:.3f}", flush=True)

    cases = [(m, "unstructured", float(s)) for s in args.sparsities.split(",") for m in args.methods.split(",")]
    cases += [(m, "filter", args.structured_sparsity) for m in args.methods.split(",") if m in STRUCTURED]
    for name, structure, sparsity in cases:
        cls = methods.get(name)
        t = time.perf_counter()
        if cls.tags.pipeline == "A":
            res = cls().prune(dense, data, sparsity=sparsity, structure=structure, recipe=recipe,
                              pretrained=True)
        else:
            res = cls().prune(recipe.build_model(data).to(device), data, sparsity=sparsity,
                              structure=structure, recipe=recipe)
        clean, robust = _evaluate(res.model, x, y, args.eps, args.eval_steps, args.restarts)
        row = {"method": name, "structure": structure, "sparsity": sparsity,
               "measured_sparsity": res.log["sparsity"],
               "report_sparsity": sparsity_report(res.model).sparsity,
               "clean": clean, "pgd": robust, "seconds": time.perf_counter() - t}
        rows.append(row)
        print(f"{name:11s} {structure:12s} {sparsity:.2f} (measured {row['measured_sparsity']:.4f}): "
              f"clean {clean:.3f} pgd {robust:.3f} [{row['seconds']:.0f}s]", flush=True)

    env = {"torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
           "git_commit": _git_commit(Path(__file__).resolve().parents[1])}
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"methods_{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"argv": sys.argv, "recipe": vars(recipe), "eval": {
        "attack": "PGD Linf", "eps": args.eps, "steps": args.eval_steps, "restarts": args.restarts,
        "n_test": int(y.numel())}, "env": env, "rows": rows}, indent=2))

    print("\n| method | clean / PGD @ 90 % US | clean / PGD @ 99 % US | clean / PGD @ 50 % S |")
    print("|---|---|---|---|")
    cell = {(r["method"], r["structure"], r["sparsity"]): f"{100 * r['clean']:.1f} / {100 * r['pgd']:.1f}"
            for r in rows}
    print(f"| dense | {100 * dense_clean:.1f} / {100 * dense_robust:.1f} | | |")
    for name in args.methods.split(","):
        print(f"| {name} | {cell.get((name, 'unstructured', 0.9), '')} | {cell.get((name, 'unstructured', 0.99), '')} "
              f"| {cell.get((name, 'filter', args.structured_sparsity), '')} |")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
