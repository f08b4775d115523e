"""``apb bench latency``: dense vs sparse latency of an architecture at several sparsities (or of a
checkpoint)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .. import apply_masks, densify, magnitude_masks, sparsify, sparsity_report
from ..bench.env import environment
from ..bench.results import atomic_write_text
from ..bench.runner import measure_latency
from ..models import get_model
from .checks import _check_finite_weights, _check_output, _load_apb_checkpoint


def _cmd_bench_latency(args, parser) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: 'cuda' requested but no GPU is available")
    torch.set_flush_denormal(True)
    dev = torch.device(args.device)
    if args.out:
        _check_output("--out", args.out)
    rows = []
    if args.checkpoint:
        sparse, cfg = _load_apb_checkpoint("--checkpoint", args.checkpoint)
        _check_finite_weights("--checkpoint", sparse, args.checkpoint)  # else "differs from dense by nan"
        shape = args.input_shape or ((1, 8, 8) if cfg["arch"] == "small_cnn" else (cfg["in_channels"], 32, 32))
        variants = [(f"checkpoint {Path(args.checkpoint).name}", densify(sparse), sparse)]
    else:
        kw = args.model_kwargs or {}
        shape = tuple(args.input_shape or ((1, 8, 8) if args.arch == "small_cnn" else (3, 32, 32)))
        try:
            torch.manual_seed(0)
            dense = get_model(args.arch, num_classes=args.num_classes, in_channels=shape[0], **kw).eval()
        except (ValueError, TypeError) as e:
            parser.error(f"argument --arch/--model-kwargs: {e}")
        variants = []
        for s in args.sparsities:
            masked = apply_masks(dense, magnitude_masks(dense, s, structure=args.structure))
            variants.append((f"{args.structure} {100 * s:g} %", masked, sparsify(masked)))
    print(f"{'model':<28} {'batch':>5} {'sparsity':>8} {'dense ms':>10} {'sparse ms':>10} {'speedup':>8}")
    for label, dense_m, sparse_m in variants:
        rep = sparsity_report(sparse_m)
        for b in args.batch:
            lat = measure_latency(dense_m, sparse_m, shape, batch=b, rounds=args.rounds, device=dev,
                                  tune=args.tune)
            if not lat["outputs_match"]:
                print(f"{label}: sparse output differs from dense by {lat['max_abs_diff']:.3g}", file=sys.stderr)
                return 1
            rows.append({"model": label, "sparsity": rep.sparsity, **lat})
            print(f"{label:<28} {b:>5} {100 * rep.sparsity:>7.2f}% {lat['dense_ms']:>10.3f} {lat['sparse_ms']:>10.3f} "
                  f"{lat['speedup']:>7.2f}x", flush=True)
    if args.out:
        atomic_write_text(args.out, json.dumps({"environment": environment(), "arch": args.arch,
                                                "input_shape": list(shape), "results": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0
