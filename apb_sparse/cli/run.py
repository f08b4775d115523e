"""``apb run``: the grid of the benchmark from the options, its executor, the run and its summary."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .. import methods as registry
from ..bench.executors import default_executor, interrupt_guard, make_executor, ray_available, submitit_available
from ..bench.leaderboard import REFERENCES, leaderboard_rows
from ..bench.presets import get_preset
from ..bench.results import read_records
from ..bench.runner import run_benchmark
from ..data.datasets import _ALIASES, DatasetNotFoundError
from .argtypes import STRUCTURE_CHOICES
from .checks import _check_arch, _check_methods, _check_names, _check_out_folder, _dedupe, _download


def _check_executor(parser, args) -> str:
    """The executor ``apb run`` uses; options of another executor are usage errors."""
    executor = default_executor() if args.executor == "auto" else args.executor
    if executor == "ray" and not ray_available():
        parser.error("argument --executor: 'ray' needs Ray: pip install 'ray>=2.9' (or apb_sparse[ray])")
    if executor == "slurm" and not submitit_available():
        parser.error("argument --executor: 'slurm' needs submitit: pip install submitit (or apb_sparse[slurm])")
    ray_only = (("--ray-address", args.ray_address, None), ("--ray-timeout", args.ray_timeout, 60.0))
    slurm_only = (("--slurm-partition", args.slurm_partition, None), ("--slurm-time", args.slurm_time, 24 * 60),
                  ("--slurm-mem-gb", args.slurm_mem_gb, None), ("--slurm-account", args.slurm_account, None),
                  ("--slurm-qos", args.slurm_qos, None), ("--slurm-constraint", args.slurm_constraint, None),
                  ("--slurm-folder", args.slurm_folder, None), ("--slurm-local", args.slurm_local, False))
    if executor == "local":
        for flag, value, default in (("--workers", args.workers, None), ("--gpus-per-cell", args.gpus_per_cell, 0.0)):
            if value != default and not (flag == "--workers" and value == 1):
                parser.error(f"argument {flag}: needs --executor ray or slurm (the local executor runs one cell "
                             f"at a time in this process)")
    for flag, value, default in (ray_only if executor != "ray" else ()) + (slurm_only if executor != "slurm" else ()):
        if value != default:
            parser.error(f"argument {flag}: needs --executor {'ray' if flag.startswith('--ray') else 'slurm'} "
                         f"(the executor is {executor})")
    if executor == "slurm":
        for flag, value, low in (("--gpus-per-cell", args.gpus_per_cell, 0), ("--cpus-per-cell", args.cpus_per_cell, 1)):
            if value != int(value) or value < low:
                parser.error(f"argument {flag}: --executor slurm gives a job whole {flag[2:5].upper()}s; "
                             f"expected an integer >= {low}, got {value:g}")
    return executor


def _make_executor(executor: str, args, out: Path):
    """The executor instance of ``apb run`` (connected, for Ray); the caller shuts it down."""
    slurm = None
    folder = None
    if executor == "slurm":
        slurm = dict(partition=args.slurm_partition, time_min=args.slurm_time, mem_gb=args.slurm_mem_gb,
                     account=args.slurm_account, qos=args.slurm_qos, constraint=args.slurm_constraint,
                     cluster="local" if args.slurm_local else "slurm")
        folder = Path(args.slurm_folder) / "%j" if args.slurm_folder else out.resolve() / "slurm" / "%j"
    return make_executor(executor, workers=args.workers, address=args.ray_address, cpus_per_cell=args.cpus_per_cell,
                         gpus_per_cell=args.gpus_per_cell, max_retries=args.max_retries, ray_timeout=args.ray_timeout,
                         folder=folder, slurm=slurm)


def _cmd_run(args, parser) -> int:
    preset = get_preset(args.preset).with_overrides(base_epochs=args.base_epochs, aa_samples=args.aa_samples,
                                                    fmn_samples=args.fmn_samples, device=args.device,
                                                    threads=args.threads)
    methods = _check_methods(parser, args.methods, "--methods")
    structures = _dedupe(args.structures or list(preset.structures), "--structures")
    if args.structured_sparsities and not args.structures:
        structures = sorted(set(structures) | {"filter"}, key=STRUCTURE_CHOICES.index)
    sparsities = {k: list(v) for k, v in preset.sparsities.items()}
    as_cell = lambda v: round(float(v), 6)  # noqa: E731  (how results.py names a cell's sparsity)
    if args.sparsities:
        sparsities["unstructured"] = _dedupe(args.sparsities, "--sparsities", as_cell)
    if args.structured_sparsities:
        sparsities["filter"] = _dedupe(args.structured_sparsities, "--structured-sparsities", as_cell)
    seeds = _dedupe(args.seeds, "--seeds") if args.seeds else list(preset.seeds)
    datasets = _dedupe(args.datasets or list(preset.datasets), "--datasets")
    archs = _dedupe(args.archs or list(preset.archs), "--archs")
    _check_names(parser, datasets, "--datasets", set(_ALIASES))
    archs = [_check_arch(parser, a, "--archs") for a in archs]
    if not any(structure in registry.get(m).structures and sparsities.get(structure)
               for m in methods for structure in structures):
        parser.error(f"argument --structures: none of the methods {methods} supports {structures} "
                     f"with the given sparsities")
    executor = _check_executor(parser, args)
    out = Path(args.out or os.path.join("runs", preset.name))
    _check_out_folder("--out", out)

    grid = dict(methods=methods, structures=structures, sparsities=sparsities, seeds=seeds, archs=archs,
                datasets=datasets)
    # Ctrl-C stops the driver even while it is blocked in native code (Ray's connection).
    with interrupt_guard():
        return _run_grid(args, preset, executor, out, grid)


def _run_grid(args, preset, executor: str, out: Path, grid: dict) -> int:
    t0 = time.perf_counter()
    ex = None
    try:
        if args.download:
            _download(grid["datasets"], args.data_dir)
        ex = _make_executor(executor, args, out)
        summary = run_benchmark(preset, out, **grid, data_dir=args.data_dir, device=preset.device,
                                progress=not args.quiet, latency=not args.no_latency, plots=not args.no_plots,
                                executor=ex, max_retries=args.max_retries)
    except DatasetNotFoundError as e:
        print(f"apb run: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"apb run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        n = len({(r["method"], r["structure"], r["sparsity"], r["seed"], r["dataset"], r["arch"])
                 for r in read_records(out / "results.jsonl", warn=False)})
        print(f"\ninterrupted: the {n} finished cell(s) are kept in {out / 'results.jsonl'}; rerun the same "
              f"command (same --out {out}) to resume with the rest", file=sys.stderr)
        return 130
    finally:
        if ex is not None:
            ex.shutdown()
    _print_summary(summary, time.perf_counter() - t0)
    return 1 if summary.failed else 0


def _print_summary(summary, seconds: float) -> None:
    rows = leaderboard_rows(read_records(summary.out_dir / "results.jsonl", warn=False))
    # Reference rows (dense, dense_base) are repeated per structure in the leaderboard: once here.
    width = max([12] + [len(r["method"]) for r in rows])
    swidth = max([9] + [len(r["structure"]) for r in rows])
    print()
    print(f"{'method':<{width}} {'structure':<{swidth}} {'seed':>4} {'sparsity':>8} {'clean%':>7} {'AA%':>6} "
          f"{'d_med':>6} {'dense ms':>9} {'sparse ms':>9} {'speedup':>7} {'b1 speedup':>10}  flags")
    seen = set()
    for r in rows:
        ref = r["method"] in REFERENCES
        key = (r["dataset"], r["arch"], r["method"], r["sparsity"], r["seed"], "" if ref else r["structure"])
        if key in seen:
            continue
        seen.add(key)

        def f(v, fmt):
            return "-" if v is None else fmt.format(v)

        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}"
        print(f"{r['method']:<{width}} {'-' if ref else r['structure']:<{swidth}} {r['seed']:>4} "
              f"{100 * r['sparsity']:>7.1f}% {pct(r['clean_acc']):>7} "
              f"{pct(r['aa_acc']):>6} {f(r['median_min_norm'], '{:.3f}'):>6} {f(r['cpu_dense_ms'], '{:.2f}'):>9} "
              f"{f(r['cpu_sparse_ms'], '{:.2f}'):>9} {f(r['cpu_speedup'], '{:.2f}x'):>7} "
              f"{f(r['b1_speedup'], '{:.2f}x'):>10}  {r['flags']}")
    print()
    print(f"ran {len(summary.ran)} cells ({getattr(summary, 'executor', 'local')} executor), skipped "
          f"{len(summary.skipped)} already finished, {len(summary.failed)} failed; wall time {seconds:.1f} s")
    if getattr(summary, "timed", 0):
        print(f"latency: {summary.timed} deployed models timed in one exclusive interleaved phase "
              f"({summary.timing_seconds:.1f} s)")
    for key, err in summary.failed:
        print(f"  FAILED {key}: {err}")
    print(f"results:     {summary.out_dir / 'results.jsonl'}")
    for kind, path in summary.files.items():
        print(f"{kind + ':':<12} {path}")
