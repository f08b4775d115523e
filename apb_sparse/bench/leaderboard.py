"""Leaderboard of benchmark records: Markdown, CSV, an HTML page and PNG plots.

Per (dataset, architecture, structure) the Markdown and HTML pages show, in this order:

1. an **APB-style pivot**: one row per method, one column per sparsity, cells "clean / AA" (seed
   means, in percent), the best AA of every column in bold, the two dense rows on top (the
   equal-budget dense reference and the pipeline-A dense base), and under it the best and the
   median method of every sparsity against the dense reference;
2. the **optimisation budget** of every pipeline (epochs, SGD steps, sum of the learning rates);
3. the **long table** (mean ± std over seeds): robustness, median min-norm distance over the
   correctly classified images and the share of clean errors, kept multiply-adds and the ideal
   speedup they allow next to the measured CPU speedup at the preset's batch and at batch 1,
   size, flags; the per-seed rows below it.

There is no aggregate rank, as in APB. The plots: robust accuracy vs sparsity (seed means with
error bars, dense mean), FMN security curves (seed-mean curve per method), measured and ideal
speedup per sparsity, and the robustness-vs-speedup Pareto view per sparsity.

Flags: ``masking?:<checks>`` (a gradient-masking check failed), ``fmn<aa`` (FMN found more
adversarial points inside eps than AutoAttack on the same images), ``sparsity!=target`` (the
pruned model misses the requested sparsity by > 0.5 points), ``sparse!=dense`` (the sparse model's
predictions differ from the dense-with-zeros model's on > 1 % of the attacked images),
``latency-output-mismatch``, ``needs-long-finetune`` (the method's class says its result needs a
budget the preset does not give; the reason is in the method notes).
"""
from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .results import atomic_write_bytes, atomic_write_text, cell_key

__all__ = ["leaderboard_rows", "aggregate_rows", "seed_rank_agreement", "pivot_rows", "budget_rows",
           "to_markdown", "to_csv", "to_html", "write_leaderboard", "write_plots", "COLUMNS", "REFERENCES"]

DENSE = "dense"
DENSE_BASE = "dense_base"
#: The reference rows: the equal-budget dense model and the pipeline-A dense base.
REFERENCES = (DENSE, DENSE_BASE)
COLUMNS = ("dataset", "arch", "structure", "method", "pipeline", "training", "schedule", "structures",
           "locality", "criterion", "seed", "sparsity", "measured_sparsity", "clean_acc", "aa_acc",
           "median_min_norm", "clean_error_share", "dense_macs", "sparse_macs", "kept_macs", "ideal_speedup",
           "cpu_dense_ms", "cpu_sparse_ms", "cpu_speedup", "cpu_speedup_q25",
           "cpu_speedup_q75", "cpu_speedup_min", "cpu_speedup_max", "cpu_dense_eager_ms",
           "cpu_speedup_vs_eager", "cpu_sparse_ms_q25", "cpu_sparse_ms_q75", "latency_batch", "latency_rounds",
           "latency_phase", "b1_dense_ms", "b1_sparse_ms", "b1_speedup", "b1_speedup_q25", "b1_speedup_q75",
           "gpu_dense_ms", "gpu_sparse_ms", "gpu_speedup", "gpu_speedup_q25", "gpu_speedup_q75",
           "size_dense_bytes", "size_sparse_bytes", "budget_epochs", "budget_steps", "budget_lr_sum",
           "role", "flags", "notes")


def _num(v) -> Optional[float]:
    if v is None:
        return None
    if isinstance(v, str):
        try:
            return float(v)  # "inf" as written by the results store
        except ValueError:
            return None
    return float(v)


def _latest(records: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    by_key: Dict[Tuple, Dict[str, Any]] = {}
    for r in records:
        by_key[cell_key(r)] = r
    return list(by_key.values())


def _is_ref(method: str) -> bool:
    return method in REFERENCES


def _training_ran(tags: Dict[str, Any], cfg: Dict[str, Any]) -> str:
    """The training types of what ran: an adversarial-training phase uses the recipe's loss
    (``recipe.mode``), whatever loss the method's paper used (HYDRA's TRADES ran as PGD here)."""
    mode = ((cfg.get("recipe") or {}).get("mode") or "").upper()
    out = []
    for t in tags.get("training", ()) or ():
        if mode in ("PGD", "TRADES") and (t == "AT" or t.startswith("AT(")):
            out.append(f"AT({mode})")
        else:
            out.append(t)
    return "/".join(out)


def leaderboard_rows(records: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Flat rows (the CSV columns) from result records; the last record of a cell wins.

    Reference rows (methods "dense" and "dense_base", structure "none") are repeated into every
    structure present for their dataset / architecture / seed, so each table carries them.
    """
    recs = _latest(records)
    structures: Dict[Tuple[str, str], set] = {}
    for r in recs:
        if not _is_ref(r["method"]):
            structures.setdefault((r["dataset"], r["arch"]), set()).add(r["structure"])
    rows = []
    for r in recs:
        tags = r.get("tags") or {}
        cfg = (r.get("config") or {}).get("preset") or {}
        lat = r.get("latency") or {}
        cpu, gpu = lat.get("cpu") or {}, lat.get("cuda") or {}
        b1 = cpu.get("batch1") or {}
        size = r.get("size_bytes") or {}
        mn = r.get("min_norm") or {}
        budget = r.get("budget") or {}
        dm, sm = _num(r.get("dense_macs")), _num(r.get("sparse_macs"))
        flags = list(r.get("flags") or [])
        if tags.get("caveat") and "needs-long-finetune" not in flags:
            flags.append("needs-long-finetune")
        base = {
            "dataset": r["dataset"], "arch": r["arch"], "structure": r["structure"], "method": r["method"],
            "pipeline": tags.get("pipeline", ""), "training": _training_ran(tags, cfg),
            "schedule": tags.get("schedule") or "", "structures": "+".join(tags.get("structure", ()) or ()),
            "locality": "+".join(tags.get("locality", ()) or ()), "criterion": tags.get("criterion", ""),
            "seed": int(r["seed"]), "sparsity": float(r["sparsity"]),
            "measured_sparsity": _num(r.get("measured_sparsity")),
            "clean_acc": _num(r.get("clean_accuracy")), "aa_acc": _num(r.get("robust_accuracy")),
            "median_min_norm": _num(mn.get("median_distance")),
            "clean_error_share": _num(mn.get("clean_error_share")),
            "dense_macs": dm, "sparse_macs": sm,
            "kept_macs": (sm / dm) if dm and sm is not None else None,
            "ideal_speedup": (dm / sm) if dm and sm else None,
            "cpu_dense_ms": _num(cpu.get("dense_ms")), "cpu_sparse_ms": _num(cpu.get("sparse_ms")),
            "cpu_speedup": _num(cpu.get("speedup")), "cpu_speedup_q25": _num(cpu.get("speedup_q25")),
            "cpu_speedup_q75": _num(cpu.get("speedup_q75")), "cpu_speedup_min": _num(cpu.get("speedup_min")),
            "cpu_speedup_max": _num(cpu.get("speedup_max")), "cpu_dense_eager_ms": _num(cpu.get("dense_eager_ms")),
            "cpu_speedup_vs_eager": _num(cpu.get("speedup_vs_eager")),
            "cpu_sparse_ms_q25": _num(cpu.get("sparse_ms_q25")), "cpu_sparse_ms_q75": _num(cpu.get("sparse_ms_q75")),
            "latency_batch": cpu.get("batch"),
            "latency_rounds": cpu.get("rounds"), "latency_phase": cpu.get("phase", "in-cell" if cpu else None),
            "b1_dense_ms": _num(b1.get("dense_ms")), "b1_sparse_ms": _num(b1.get("sparse_ms")),
            "b1_speedup": _num(b1.get("speedup")), "b1_speedup_q25": _num(b1.get("speedup_q25")),
            "b1_speedup_q75": _num(b1.get("speedup_q75")),
            "gpu_dense_ms": _num(gpu.get("dense_ms")),
            "gpu_sparse_ms": _num(gpu.get("sparse_ms")), "gpu_speedup": _num(gpu.get("speedup")),
            "gpu_speedup_q25": _num(gpu.get("speedup_q25")), "gpu_speedup_q75": _num(gpu.get("speedup_q75")),
            "size_dense_bytes": size.get("dense"), "size_sparse_bytes": size.get("sparse"),
            "budget_epochs": budget.get("epochs"), "budget_steps": budget.get("steps"),
            "budget_lr_sum": _num(budget.get("lr_sum")), "budget_phases": budget.get("phases") or [],
            "role": r.get("role") or ("" if r["method"] != DENSE else "dense base"),
            "flags": " ".join(flags),
            "notes": tags.get("notes", ""), "caveat": tags.get("caveat", ""),
        }
        if _is_ref(r["method"]):
            for s in sorted(structures.get((r["dataset"], r["arch"]), {"unstructured"})):
                rows.append(dict(base, structure=s))
        else:
            rows.append(base)

    def order(row):
        aa = row["aa_acc"] if row["aa_acc"] is not None else -1.0
        return (row["dataset"], row["arch"], row["structure"], _ref_rank(row["method"]), row["sparsity"],
                -aa, row["method"], row["seed"])
    return sorted(rows, key=order)


def _ref_rank(method: str) -> int:
    return REFERENCES.index(method) if method in REFERENCES else len(REFERENCES)


# ----------------------------------------------------------------------------------- formatting
def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _f(v, fmt="{:.3f}") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return fmt.format(v)


def _bytes(v) -> str:
    if v is None:
        return "-"
    v = float(v)
    for unit in ("B", "KB", "MB", "GB"):
        if v < 1024 or unit == "GB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return "-"  # pragma: no cover


def _ref_label(row) -> str:
    e = row.get("budget_epochs")
    ep = f", {e:.0f} epochs" if e else ""
    if row["method"] == DENSE_BASE:
        return f"dense base of pipeline A (AT{ep}): the model pipeline-A methods prune"
    if "reference" in (row.get("role") or ""):
        return f"dense reference (AT, every method's budget{ep})"
    return "dense base (AT)"


def _taxonomy(row) -> str:
    if _is_ref(row["method"]):
        return _ref_label(row)
    parts = [row["pipeline"], row["training"], row["schedule"], row["structures"], row["locality"], row["criterion"]]
    return " ".join(p for p in parts if p)


def _groups(rows: List[Dict[str, Any]]) -> List[Tuple[Tuple[str, str, str], List[Dict[str, Any]]]]:
    out: Dict[Tuple[str, str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["dataset"], r["arch"], r["structure"]), []).append(r)
    return list(out.items())


def _iqr(r, prefix="cpu_speedup") -> str:
    lo, hi = r.get(prefix + "_q25"), r.get(prefix + "_q75")
    return "-" if lo is None or hi is None else f"{lo:.2f}-{hi:.2f}"


def _speed_columns(rows: List[Dict[str, Any]]) -> List[Tuple[str, Any]]:
    """Kept MACs, ideal and measured speedups (preset batch and batch 1), GPU when measured."""
    batch = next((r["latency_batch"] for r in rows if r.get("latency_batch")), None)
    bn = f"batch {batch}" if batch else "batch"
    cols: List[Tuple[str, Any]] = [
        ("kept MACs %", lambda r: _pct(r["kept_macs"])),
        ("ideal speedup", lambda r: _f(r["ideal_speedup"], "{:.2f}x")),
        (f"CPU speedup ({bn})", lambda r: _f(r["cpu_speedup"], "{:.2f}x")),
        ("speedup IQR", _iqr),
        (f"CPU sparse ms ({bn})", lambda r: _f(r["cpu_sparse_ms"], "{:.2f}")),
        ("CPU speedup (batch 1)", lambda r: _f(r["b1_speedup"], "{:.2f}x")),
        ("CPU sparse ms (batch 1)", lambda r: _f(r["b1_sparse_ms"], "{:.3f}")),
        ("vs eager dense", lambda r: _f(r["cpu_speedup_vs_eager"], "{:.2f}x"))]
    if any(r["gpu_speedup"] is not None for r in rows):
        cols += [("GPU dense ms", lambda r: _f(r["gpu_dense_ms"], "{:.3f}")),
                 ("GPU sparse ms", lambda r: _f(r["gpu_sparse_ms"], "{:.3f}")),
                 ("GPU speedup", lambda r: _f(r["gpu_speedup"], "{:.2f}x"))]
    return cols


def _table_columns(rows: List[Dict[str, Any]]) -> List[Tuple[str, Any]]:
    """(header, row -> cell) of the per-seed tables; GPU and seed columns only when present."""
    multi_seed = len({r["seed"] for r in rows}) > 1
    cols: List[Tuple[str, Any]] = [("method", lambda r: r["method"]), ("taxonomy", _taxonomy)]
    if multi_seed:
        cols.append(("seed", lambda r: str(r["seed"])))
    cols += [("sparsity %", lambda r: f"{100 * r['sparsity']:.1f}"),
             ("measured %", lambda r: _pct(r["measured_sparsity"])),
             ("clean %", lambda r: _pct(r["clean_acc"])),
             ("AA %", lambda r: _pct(r["aa_acc"])),
             ("median min-norm", lambda r: _f(r["median_min_norm"])),
             ("clean errors %", lambda r: _pct(r["clean_error_share"])),
             ("CPU dense ms", lambda r: _f(r["cpu_dense_ms"], "{:.2f}")),
             ("CPU sparse ms", lambda r: _f(r["cpu_sparse_ms"], "{:.2f}")),
             ("CPU speedup", lambda r: _f(r["cpu_speedup"], "{:.2f}x")),
             ("speedup IQR", _iqr),
             ("kept MACs %", lambda r: _pct(r["kept_macs"])),
             ("ideal speedup", lambda r: _f(r["ideal_speedup"], "{:.2f}x")),
             ("CPU speedup (batch 1)", lambda r: _f(r["b1_speedup"], "{:.2f}x"))]
    if any(r["gpu_speedup"] is not None for r in rows):
        cols += [("GPU dense ms", lambda r: _f(r["gpu_dense_ms"], "{:.3f}")),
                 ("GPU sparse ms", lambda r: _f(r["gpu_sparse_ms"], "{:.3f}")),
                 ("GPU speedup", lambda r: _f(r["gpu_speedup"], "{:.2f}x"))]
    cols += [("size dense", lambda r: _bytes(r["size_dense_bytes"])),
             ("size sparse", lambda r: _bytes(r["size_sparse_bytes"])),
             ("flags", lambda r: r["flags"] or "")]
    return cols


# ----------------------------------------------------------------------------------- seeds
def _mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None, None, 0
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd, len(v)


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def aggregate_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (dataset, arch, structure, method, sparsity) over its seeds: mean and sample
    std of the accuracies, distances and kept MACs, median of the latencies and speedups, the
    widest interquartile range of the per-round speedups, union of the flags."""
    by: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["dataset"], r["arch"], r["structure"], r["method"], r["sparsity"]), []).append(r)
    out = []
    for (dataset, arch, structure, method, sparsity), grp in by.items():
        a = dict(grp[0])
        a["seeds"] = sorted(r["seed"] for r in grp)
        for k in ("clean_acc", "aa_acc", "median_min_norm", "measured_sparsity", "clean_error_share",
                  "kept_macs", "ideal_speedup", "budget_steps", "budget_lr_sum", "budget_epochs"):
            a[k], a[k + "_std"], _ = _mean_std([r[k] for r in grp])
        for k in ("cpu_dense_ms", "cpu_sparse_ms", "cpu_speedup", "cpu_speedup_vs_eager", "b1_dense_ms",
                  "b1_sparse_ms", "b1_speedup", "gpu_dense_ms", "gpu_sparse_ms", "gpu_speedup",
                  "size_dense_bytes", "size_sparse_bytes"):
            a[k] = _median([r[k] for r in grp])
        for prefix in ("cpu_speedup", "b1_speedup"):
            q25 = [r[prefix + "_q25"] for r in grp if r[prefix + "_q25"] is not None]
            q75 = [r[prefix + "_q75"] for r in grp if r[prefix + "_q75"] is not None]
            a[prefix + "_q25"] = min(q25) if q25 else None
            a[prefix + "_q75"] = max(q75) if q75 else None
        a["flags"] = " ".join(sorted({f for r in grp for f in (r["flags"] or "").split()}))
        out.append(a)

    def order(row):
        aa = row["aa_acc"] if row["aa_acc"] is not None else -1.0
        return (row["dataset"], row["arch"], row["structure"], _ref_rank(row["method"]), row["sparsity"], -aa,
                row["method"])
    return sorted(out, key=order)


def seed_rank_agreement(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (dataset, arch, structure, sparsity): Kendall's tau between the method rankings (by
    robust accuracy) of every pair of seeds, over the methods both seeds have; and their mean.

    tau = 1: the seeds rank the methods identically; 0: unrelated rankings; -1: reversed."""
    from itertools import combinations

    from scipy.stats import kendalltau

    by: Dict[Tuple, Dict[int, Dict[str, float]]] = {}
    for r in rows:
        if r["method"] == DENSE or r["aa_acc"] is None:
            continue
        by.setdefault((r["dataset"], r["arch"], r["structure"], r["sparsity"]), {}) \
          .setdefault(r["seed"], {})[r["method"]] = r["aa_acc"]
    out = []
    for key, per_seed in sorted(by.items()):
        pairs = []
        for a, b in combinations(sorted(per_seed), 2):
            common = sorted(set(per_seed[a]) & set(per_seed[b]))
            if len(common) < 2:
                continue
            tau = kendalltau([per_seed[a][m] for m in common], [per_seed[b][m] for m in common]).statistic
            pairs.append({"seeds": (a, b), "tau": None if tau is None or not math.isfinite(tau) else float(tau),
                          "methods": len(common)})
        if pairs:
            taus = [p["tau"] for p in pairs if p["tau"] is not None]
            out.append({"dataset": key[0], "arch": key[1], "structure": key[2], "sparsity": key[3],
                        "pairs": pairs, "mean_tau": sum(taus) / len(taus) if taus else None,
                        "methods": max(p["methods"] for p in pairs)})
    return out


def _pm(mean, std, scale=100.0, fmt="{:.1f}") -> str:
    if mean is None:
        return "-"
    if std is None:
        return fmt.format(scale * mean)
    return f"{fmt.format(scale * mean)} ± {fmt.format(scale * std)}"


def _aggregate_columns(rows: List[Dict[str, Any]]) -> List[Tuple[str, Any]]:
    cols: List[Tuple[str, Any]] = [
        ("method", lambda r: r["method"]), ("taxonomy", _taxonomy),
        ("seeds", lambda r: str(len(r["seeds"]))),
        ("sparsity %", lambda r: f"{100 * r['sparsity']:.1f}"),
        ("measured %", lambda r: _pct(r["measured_sparsity"])),
        ("clean %", lambda r: _pm(r["clean_acc"], r["clean_acc_std"])),
        ("AA %", lambda r: _pm(r["aa_acc"], r["aa_acc_std"])),
        ("median min-norm", lambda r: _pm(r["median_min_norm"], r["median_min_norm_std"], 1.0, "{:.3f}")),
        ("clean errors %", lambda r: _pct(r["clean_error_share"]))]
    cols += _speed_columns(rows)
    cols += [("size sparse", lambda r: _bytes(r["size_sparse_bytes"])), ("flags", lambda r: r["flags"] or "")]
    return cols


# ----------------------------------------------------------------------------------- pivot
def pivot_rows(agg: List[Dict[str, Any]]) -> Tuple[List[float], List[Dict[str, Any]], Dict[float, Dict[str, Any]]]:
    """The APB-style view of one (dataset, arch, structure) group of aggregated rows.

    Returns:
        ``(sparsities, rows, summary)``: ``rows`` has one entry per method (reference rows first,
        then methods by mean AA over the sparsities, best first) with ``cells[sparsity] ->
        aggregated row`` and ``best`` (the sparsities where its mean AA is the column's best
        among the methods); ``summary[sparsity]`` holds the best and the median method's mean AA
        and clean accuracy and the dense reference's, for the lines under the table.
    """
    sps = sorted({r["sparsity"] for r in agg if not _is_ref(r["method"])})
    by_m: Dict[str, Dict[float, Dict[str, Any]]] = {}
    for r in agg:
        by_m.setdefault(r["method"], {})[r["sparsity"]] = r
    best: Dict[float, float] = {}
    for s in sps:
        vals = [c[s]["aa_acc"] for m, c in by_m.items() if not _is_ref(m) and s in c and c[s]["aa_acc"] is not None]
        if vals:
            best[s] = max(vals)
    ref = {m: next(iter(by_m[m].values())) for m in REFERENCES if m in by_m}

    def mean_aa(m):
        v = [c["aa_acc"] for c in by_m[m].values() if c["aa_acc"] is not None]
        return sum(v) / len(v) if v else -1.0
    methods = [m for m in REFERENCES if m in by_m] + sorted(
        (m for m in by_m if not _is_ref(m)), key=lambda m: (-mean_aa(m), m))
    rows = []
    for m in methods:
        cells = ({s: ref[m] for s in sps} if _is_ref(m) else by_m[m])
        first = next(iter(by_m[m].values()))
        rows.append({"method": m, "row": first, "cells": cells,
                     "best": [s for s in sps if not _is_ref(m) and s in cells
                              and cells[s]["aa_acc"] is not None and cells[s]["aa_acc"] == best.get(s)],
                     "flags": sorted({f for c in by_m[m].values() for f in (c["flags"] or "").split()})})
    summary: Dict[float, Dict[str, Any]] = {}
    for s in sps:
        ms = [(c[s]["aa_acc"], c[s]["clean_acc"], m) for m, c in by_m.items()
              if not _is_ref(m) and s in c and c[s]["aa_acc"] is not None]
        if not ms:
            continue
        ms.sort(reverse=True)
        aas = [a for a, _, _ in ms]
        summary[s] = {"best_method": ms[0][2], "best_aa": ms[0][0], "best_clean": ms[0][1],
                      "median_aa": _median(aas), "median_clean": _median([c for _, c, _ in ms if c is not None]),
                      "methods": len(ms),
                      "dense_aa": ref[DENSE]["aa_acc"] if DENSE in ref else None,
                      "dense_clean": ref[DENSE]["clean_acc"] if DENSE in ref else None}
    return sps, rows, summary


def _pivot_cell(r: Optional[Dict[str, Any]]) -> str:
    if r is None:
        return "-"
    return f"{_pct(r['clean_acc'])} / {_pct(r['aa_acc'])}"


def _pivot_summary_lines(sps, summary) -> List[str]:
    lines = []
    for s in sps:
        x = summary.get(s)
        if not x:
            continue
        d = x["dense_aa"]
        gap = (lambda v: "" if d is None or v is None else f" ({100 * (v - d):+.1f} vs dense)")
        lines.append(f"- {100 * s:.0f} %: best **{x['best_method']}** {_pct(x['best_clean'])} / "
                     f"{_pct(x['best_aa'])}{gap(x['best_aa'])}; median of {x['methods']} methods "
                     f"{_pct(x['median_clean'])} / {_pct(x['median_aa'])}{gap(x['median_aa'])}"
                     + ("" if d is None else f"; dense reference {_pct(x['dense_clean'])} / {_pct(d)}"))
    return lines


def budget_rows(agg: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per method of a group: its training phases and totals (epochs, SGD steps, sum
    of the learning rates), from its first sparsity's first seed (budgets do not depend on
    them)."""
    seen, out = set(), []
    for r in sorted(agg, key=lambda r: (_ref_rank(r["method"]), r["pipeline"] or "", r["method"], r["sparsity"])):
        if r["method"] in seen or r.get("budget_steps") is None:
            continue
        seen.add(r["method"])
        phases = [p for p in (r.get("budget_phases") or []) if p.get("steps")]
        out.append({"method": r["method"], "pipeline": r["pipeline"] or "-",
                    "phases": " + ".join(f"{p['phase']} {p['epochs']} ep ({p['steps']} steps, lr {p['lr']:.3g})"
                                         for p in phases),
                    "epochs": r.get("budget_epochs"), "steps": r.get("budget_steps"),
                    "lr_sum": r.get("budget_lr_sum")})
    return out


def _budget_md(brows: List[Dict[str, Any]]) -> List[str]:
    if not brows:
        return []
    out = ["| method | pipeline | phases (epochs, SGD steps, peak lr; cosine per phase) | epochs | SGD steps | sum of lr |",
           "|---|---|---|---|---|---|"]
    for b in brows:
        out.append(f"| {b['method']} | {b['pipeline']} | {b['phases']} | {_f(b['epochs'], '{:.0f}')} | "
                   f"{_f(b['steps'], '{:.0f}')} | {_f(b['lr_sum'], '{:.2f}')} |")
    return out


# ----------------------------------------------------------------------------------- text
def _cfg(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    return next(((r.get("config") or {}).get("preset") for r in records if (r.get("config") or {}).get("preset")), {}) or {}


def _how_to_read(records: List[Dict[str, Any]], rows: List[Dict[str, Any]]) -> List[str]:
    """The "how to read this" block: what the columns compare, in the records' own terms."""
    if not records:
        return []
    cfg = _cfg(records)
    aa = next(((x.get("autoattack") or {}).get("attack") for x in records if x.get("autoattack")), "?")
    lat = next(((x.get("latency") or {}).get("cpu") for x in records if (x.get("latency") or {}).get("cpu")), {})
    seeds = sorted({row["seed"] for row in rows})
    eps = _f(cfg.get("eps"), "{:.4g}")
    n_aa = next(((x.get("autoattack") or {}).get("n_samples") for x in records if x.get("autoattack")),
                cfg.get("aa_samples"))
    lines = ["**How to read this**", ""]
    lines.append("- **pivot** (first table of each section): APB's layout, one row per method and one column "
                 "per sparsity, cells *clean % / AA %*" + (" (means over the seeds)" if len(seeds) > 1 else "")
                 + "; the best AA % of each column is in bold. Under it: the best and the median method of "
                   "each sparsity against the dense reference.")
    if cfg.get("attack") == "standard":
        lines.append(f"- **AA %**: robust accuracy under AutoAttack version 'standard', {cfg.get('norm')} "
                     f"eps={eps}, on the first {n_aa} test images.")
    else:
        lines.append(f"- **AA %**: robust accuracy under a *custom AutoAttack subset*, cheaper than AutoAttack "
                     f"'standard' (`{aa}`: APGD-CE, then APGD-T on the points still robust), {cfg.get('norm')} "
                     f"eps={eps}, on {n_aa} test images. It is an upper bound of the "
                     "robust accuracy 'standard' would report; compare methods with each other, not with papers.")
    total = None
    if cfg:
        total = (cfg.get("base_epochs") or 0) + (cfg.get("prune_epochs") or 0) + (cfg.get("finetune_epochs") or 0)
    lines.append(f"- **dense** row: a dense model adversarially trained with the same total budget as every "
                 f"method ({total} epochs); **dense_base**: the {cfg.get('base_epochs')}-epoch dense base that "
                 "pipeline-A methods prune and finetune. The **budget** table gives every pipeline's epochs, SGD "
                 "steps and sum of learning rates.")
    lines.append("- **taxonomy**: the survey's tags of what ran here: an adversarial-training phase uses the "
                 f"recipe's loss (AT({((cfg.get('recipe') or {}).get('mode') or '?').upper()})), whatever the paper used.")
    lines.append("- **median min-norm**: median FMN distance over the *correctly classified* images (a clean "
                 "error has distance 0), with the share of clean errors beside it.")
    if lat:
        lines.append(f"- **CPU speedup**: latency of the dense model over the latency of the method's sparse "
                     f"model, both deployed the same way (`apb_sparse.deploy`: BatchNorm folded, ReLU / residual "
                     f"fused, TorchScript graph; the dense one with `path=\"dense\"`), so it is what the sparsity "
                     f"alone buys; batch {lat.get('batch')} and **batch 1**, {lat.get('threads') or '?'} thread(s), "
                     f"median of {lat.get('rounds')} rounds"
                     + (" of process CPU time (one thread: the time slices the OS gave to other jobs are left "
                        "out; on an idle machine it equals the wall time). " if lat.get("clock") == "process CPU time"
                        else " of wall-clock time. ")
                     + ("All deployed models of the run and the dense baseline were timed in **one exclusive phase** "
                        "after training, interleaved round by round, with no cell training on the machine."
                        if lat.get("phase") == "exclusive" else "Timed inside each cell (older run: concurrent work may disturb it)."))
        lines.append("- **kept MACs %** / **ideal speedup**: multiply-adds of the sparse model over the dense "
                     "model's (one image), and their inverse: the speedup a kernel that costs exactly one unit per "
                     "kept multiply-add would reach. The gap to the measured speedup is what memory traffic, "
                     "layout changes and the layers left dense cost.")
        lines.append("- **speedup IQR** (and the error bars of the speedup plots): the interquartile range of the "
                     "per-round ratios dense / sparse, both timed in the same round; **vs eager dense**: the "
                     "speedup over the dense model run by eager torch with BatchNorm unfolded.")
    if len(seeds) > 1:
        lines.append(f"- **± **: mean ± sample standard deviation over the {len(seeds)} seeds {seeds} "
                     "(different initialisation, data order and attack randomness). **Kendall tau**: agreement "
                     "of two seeds' rankings of the methods by AA % at one sparsity (1 = the same order, "
                     "0 = unrelated); a low tau means that the ranking at that sparsity is mostly noise.")
    else:
        lines.append(f"- one seed ({seeds[0] if seeds else '-'}): differences of a few points between methods can "
                     "be noise; run several (`--seeds 0 1 2`) to see the spread and the agreement of the rankings.")
    return lines + [""]


def _protocol_lines(records: List[Dict[str, Any]]) -> List[str]:
    """What was measured, from the records' own config and environment (the grid that ran)."""
    if not records:
        return []
    cfg = _cfg(records)
    r = records[0]
    env = next((x.get("environment") for x in records if x.get("environment")), {}) or {}
    aa = next(((x.get("autoattack") or {}).get("attack") for x in records if x.get("autoattack")), "?")
    mn = next((x.get("min_norm") for x in records if x.get("min_norm")), {}) or {}
    lat = next(((x.get("latency") or {}).get("cpu") for x in records if (x.get("latency") or {}).get("cpu")), {})
    executor = (r.get("config") or {}).get("executor")
    latest = _latest(records)
    methods = sorted({x["method"] for x in latest if not _is_ref(x["method"])})
    sps = sorted({float(x["sparsity"]) for x in latest if not _is_ref(x["method"])})
    seeds = sorted({int(x["seed"]) for x in latest})
    lines = []
    if cfg:
        lines.append(f"- preset `{cfg.get('name')}`: {cfg.get('description', '')}")
        lines.append(f"- this run: {len(methods)} methods ({', '.join(methods)}), sparsities "
                     f"{', '.join(f'{100 * s:g} %' for s in sps)}, seeds {seeds}")
        rec = cfg.get("recipe") or {}
        lines.append(f"- recipe: {(rec.get('mode') or 'pgd').upper()} adversarial training ({cfg.get('norm')} "
                     f"eps={_f(cfg.get('eps'), '{:.4g}')}, {rec.get('steps')} attack steps), batch "
                     f"{rec.get('batch_size')}, SGD lr {rec.get('lr')} (finetuning {rec.get('finetune_lr')}), "
                     f"cosine per phase; pipeline A: base {cfg.get('base_epochs')} + prune {cfg.get('prune_epochs')} "
                     f"+ finetune {cfg.get('finetune_epochs')} epochs; B/D: the same total from scratch")
        if cfg.get("attack") == "standard":
            lines.append(f"- AA %: AutoAttack version 'standard', {cfg.get('norm')} eps={_f(cfg.get('eps'), '{:.4g}')}, "
                         f"first {cfg.get('aa_samples')} test images")
        else:
            lines.append(f"- AA %: **custom AutoAttack subset, cheaper than 'standard'** (`{aa}`), "
                         f"{cfg.get('norm')} eps={_f(cfg.get('eps'), '{:.4g}')}, first {cfg.get('aa_samples')} test images")
        lines.append(f"- median min-norm: median per-image {cfg.get('norm')} distance found by FMN "
                     f"({cfg.get('fmn_steps')} steps) over the correctly classified images among the first "
                     f"{mn.get('n_samples', cfg.get('fmn_samples'))} test images; gradient-masking checks on "
                     f"{cfg.get('check_samples')} images")
    if lat:
        lines.append(f"- latency: batch {lat.get('batch')} and batch 1, median of {lat.get('rounds')} interleaved "
                     f"rounds ({lat.get('clock', 'wall clock')}); baseline: {lat.get('baseline', 'dense model')}; "
                     f"CPU {env.get('cpu', '?')}, {lat.get('threads') or env.get('threads', '?')} threads, kernel "
                     f"{env.get('apb_sparse_kernel', '?')}" + (f"; GPU {env['gpu']}" if env.get("gpu") else ""))
    cells = [x for x in latest if (x.get("seconds") or {}).get("cpu") is not None]
    if cells:
        cpu = sum(float(x["seconds"]["cpu"]) for x in cells)
        wall = sum(float(x["seconds"].get("cell") or 0.0) for x in cells)
        lines.append(f"- compute: {len(cells)} cells, {cpu / 60:.1f} CPU minutes in the cells' worker processes "
                     f"({wall / 60:.1f} minutes of cell wall time, summed over the parallel workers)")
    lines.append("- size: bytes of the saved state dict (safetensors); sparse layers store only nonzeros")
    lines.append(f"- torch {env.get('torch', '?')}, commit {env.get('git_commit', '?')}, {env.get('time_utc', '')}"
                 + (f", {executor} executor" if executor else ""))
    return lines


def _tau_lines(tau: List[Dict[str, Any]], dataset: str, arch: str, structure: str) -> List[str]:
    lines = []
    for t in tau:
        if (t["dataset"], t["arch"], t["structure"]) != (dataset, arch, structure):
            continue
        pairs = ", ".join(f"seeds {a}/{b}: {_f(p['tau'], '{:+.2f}')}"
                          for p in t["pairs"] for a, b in [p["seeds"]])
        mean = "-" if t["mean_tau"] is None else f"{t['mean_tau']:+.2f}"
        lines.append(f"- sparsity {100 * t['sparsity']:.1f} %: Kendall tau {mean} over {t['methods']} methods ({pairs})")
    return lines


def _md_table(cols, rows) -> List[str]:
    out = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(fn(r)).replace("|", "/") for _, fn in cols) + " |")
    return out


def _pivot_md(sps, prows) -> List[str]:
    out = ["| method | taxonomy | " + " | ".join(f"{100 * s:g} %" for s in sps) + " | flags |",
           "|---|---|" + "---|" * len(sps) + "---|"]
    for p in prows:
        cells = []
        for s in sps:
            c = _pivot_cell(p["cells"].get(s))
            cells.append(f"**{c}**" if s in p["best"] else (f"*{c}*" if _is_ref(p["method"]) else c))
        out.append(f"| {p['method']} | {_taxonomy(p['row'])} | " + " | ".join(cells) + f" | {' '.join(p['flags'])} |")
    return out


def _sections(records: List[Dict[str, Any]]):
    """Per (dataset, arch, structure): its per-seed rows, aggregated rows, pivot and budget rows."""
    rows = leaderboard_rows(records)
    agg = aggregate_rows(rows)
    for key, grp in _groups(rows):
        agrp = [r for r in agg if (r["dataset"], r["arch"], r["structure"]) == key]
        sps, prows, summary = pivot_rows(agrp)
        yield key, grp, agrp, (sps, prows, summary), budget_rows(agrp)


def _notes(rows: List[Dict[str, Any]]) -> List[Tuple[str, str]]:
    return sorted({(r["method"], r["notes"] + (f" **Flag needs-long-finetune**: {r['caveat']}." if r.get("caveat") else ""))
                   for r in rows if r.get("notes") or r.get("caveat")})


def to_markdown(records: Iterable[Dict[str, Any]], *, title: str = "apb_sparse leaderboard") -> str:
    """The leaderboard as Markdown: a "how to read this" block, the protocol, and per dataset /
    arch / structure the APB-style pivot, the budget table, the long table (mean ± std over
    seeds and the Kendall tau between seeds' rankings when there are several seeds) and the
    per-seed rows."""
    records = list(records)
    rows = leaderboard_rows(records)
    out = [f"# {title}", ""]
    out += _how_to_read(records, rows)
    out += _protocol_lines(records)
    multi = len({r["seed"] for r in rows}) > 1
    tau = seed_rank_agreement(rows) if multi else []
    for (dataset, arch, structure), grp, agrp, (sps, prows, summary), brows in _sections(records):
        out += ["", f"## {dataset} / {arch} / {structure}", ""]
        if sps:
            out += [f"### Clean / AA % by sparsity (APB layout{', seed means' if multi else ''}; best AA per column in bold)", ""]
            out += _pivot_md(sps, prows)
            sl = _pivot_summary_lines(sps, summary)
            if sl:
                out += [""] + sl
        if brows:
            out += ["", "### Optimisation budget of each method", ""] + _budget_md(brows)
        out += ["", "### All columns" + (" (mean ± std over seeds)" if multi else ""), ""]
        if multi:
            out += _md_table(_aggregate_columns(agrp), agrp)
            tl = _tau_lines(tau, dataset, arch, structure)
            if tl:
                out += ["", "Agreement of the seeds' method rankings (by AA %):", ""] + tl
            out += ["", "<details><summary>per-seed rows</summary>", ""]
        out += _md_table(_table_columns(grp), grp)
        if multi:
            out += ["", "</details>"]
    notes = _notes(rows)
    if notes:
        out += ["", "## Method notes (differences from the authors' code; docs/methods.md)", ""]
        out += [f"- **{m}**: {n}" for m, n in notes]
    if not rows:
        out.append("(no results yet)")
    return "\n".join(out) + "\n"


def to_csv(records: Iterable[Dict[str, Any]]) -> str:
    """All rows with raw numbers (fractions, milliseconds, bytes), one per cell and seed."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in leaderboard_rows(records):
        w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    return buf.getvalue()


# ----------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc}h3{font-size:1.05em;margin-top:1.5em}
.scroll{overflow-x:auto;max-width:100%;margin-bottom:1em}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}
td.l,th.l{text-align:left}td.tax{white-space:normal;min-width:12em;max-width:22em;text-align:left}
th{background:#eee;position:sticky;top:0;cursor:pointer;user-select:none}
th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
tr.ref{background:#f4f4f4;font-style:italic}tr:hover{background:#fffbe0}
td.best{font-weight:bold;background:#e6f4e6}.flag{color:#b00;white-space:normal;min-width:8em;text-align:left}
.read{background:#f4f8ff;border:1px solid #cde;padding:0.5em 1em}
input.filter{margin:0.3em 0;padding:3px 6px;width:22em}
.plots img{max-width:100%;height:auto;border:1px solid #eee;margin:0.5em 0}
.note{font-size:0.9em}
"""

# Sort by a click on a header (numbers by value, text alphabetically; a second click reverses),
# filter rows by a text box above each table.
_JS = """
function apbCell(tr, i){const c=tr.children[i];return c?c.textContent.trim():"";}
function apbNum(t){const m=t.replace(/[,\\s]/g,"").match(/^[-+]?[0-9]*\\.?[0-9]+(e[-+]?[0-9]+)?/i);return m?parseFloat(m[0]):null;}
document.querySelectorAll("table.sortable").forEach(function(tbl){
  const heads=tbl.querySelectorAll("thead th");
  heads.forEach(function(th,i){th.addEventListener("click",function(){
    const body=tbl.tBodies[0];const rows=Array.from(body.rows);
    const asc=!th.classList.contains("sorted-asc");
    heads.forEach(h=>h.classList.remove("sorted-asc","sorted-desc"));
    th.classList.add(asc?"sorted-asc":"sorted-desc");
    rows.sort(function(a,b){const x=apbCell(a,i),y=apbCell(b,i);const nx=apbNum(x),ny=apbNum(y);
      let r=(nx!==null&&ny!==null)?nx-ny:(nx!==null?-1:(ny!==null?1:x.localeCompare(y)));return asc?r:-r;});
    rows.forEach(r=>body.appendChild(r));});});
});
document.querySelectorAll("input.filter").forEach(function(inp){
  const tbl=document.getElementById(inp.dataset.table);
  inp.addEventListener("input",function(){const q=inp.value.toLowerCase().split(/\\s+/).filter(Boolean);
    Array.from(tbl.tBodies[0].rows).forEach(function(tr){const t=tr.textContent.toLowerCase();
      tr.style.display=q.every(w=>t.includes(w))?"":"none";});});
});
"""


class _Ids:
    def __init__(self):
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"t{self.n}"


def _html_table(parts: List[str], cols, grp, ids: _Ids, *, best=None, filter_box: bool = True) -> None:
    """A sortable table (click a header), with a filter box above it."""
    e = html.escape
    tid = ids()
    if filter_box:
        parts.append(f"<input class='filter' data-table='{tid}' placeholder='filter rows (e.g. 90.0 flyingbird)'>")
    parts.append(f"<div class='scroll'><table class='sortable' id='{tid}'><thead><tr>")
    parts += [f"<th class='{'l' if h in ('method', 'taxonomy', 'flags') else ''}'>{e(h)}</th>" for h, _ in cols]
    parts.append("</tr></thead><tbody>")
    for r in grp:
        parts.append(f"<tr class='{'ref' if _is_ref(r['method']) else ''}'>")
        for h, fn in cols:
            cls = {"flags": "flag", "taxonomy": "tax", "method": "l"}.get(h, "")
            if best is not None and best(r, h):
                cls += " best"
            parts.append(f"<td class='{cls}'>{e(str(fn(r)))}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table></div>")


def _md_inline(text: str) -> str:
    """The little Markdown of our own lines (**bold**, *em*, `code`) as HTML."""
    import re

    t = html.escape(text, quote=False)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    t = re.sub(r"\*(.+?)\*", r"<i>\1</i>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def to_html(records: Iterable[Dict[str, Any]], *, title: str = "apb_sparse leaderboard",
            images: Sequence[str] = (), image_root: Optional[Path] = None) -> str:
    """One self-contained HTML page: how to read it, the protocol, per group the pivot, the
    budgets and the sortable / filterable long tables, and the plots embedded as data URIs
    (``images`` relative to ``image_root``; linked instead when ``image_root`` is None)."""
    records = list(records)
    rows = leaderboard_rows(records)
    e = html.escape
    ids = _Ids()
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>{e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    how = [l for l in _how_to_read(records, rows) if l.startswith("- ")]
    if how:
        parts.append("<div class='read'><b>How to read this</b><ul>")
        parts += [f"<li>{_md_inline(l[2:])}</li>" for l in how]
        parts.append("</ul></div>")
    parts.append("<ul>")
    parts += [f"<li>{_md_inline(l[2:])}</li>" for l in _protocol_lines(records)]
    parts.append("</ul>")
    multi = len({r["seed"] for r in rows}) > 1
    tau = seed_rank_agreement(rows) if multi else []
    for (dataset, arch, structure), grp, agrp, (sps, prows, summary), brows in _sections(records):
        parts.append(f"<h2>{e(dataset)} / {e(arch)} / {e(structure)}</h2>")
        if sps:
            parts.append(f"<h3>Clean / AA % by sparsity (APB layout{', seed means' if multi else ''}; "
                         "best AA per column in bold)</h3>")
            cols = [("method", lambda p: p["method"]), ("taxonomy", lambda p: _taxonomy(p["row"]))]
            for s in sps:
                cols.append((f"{100 * s:g} %", (lambda p, s=s: _pivot_cell(p["cells"].get(s)))))
            cols.append(("flags", lambda p: " ".join(p["flags"])))
            labels = {f"{100 * s:g} %": s for s in sps}
            _html_table(parts, cols, prows, ids, filter_box=False,
                        best=lambda p, h: h in labels and labels[h] in p["best"])
            sl = _pivot_summary_lines(sps, summary)
            if sl:
                parts.append("<ul>" + "".join(f"<li>{_md_inline(l[2:])}</li>" for l in sl) + "</ul>")
        if brows:
            parts.append("<h3>Optimisation budget of each method</h3>")
            bcols = [("method", lambda b: b["method"]), ("pipeline", lambda b: b["pipeline"]),
                     ("taxonomy", lambda b: b["phases"]), ("epochs", lambda b: _f(b["epochs"], "{:.0f}")),
                     ("SGD steps", lambda b: _f(b["steps"], "{:.0f}")), ("sum of lr", lambda b: _f(b["lr_sum"], "{:.2f}"))]
            _html_table(parts, bcols, brows, ids, filter_box=False)
        parts.append("<h3>All columns" + (" (mean ± std over seeds)" if multi else "") + "</h3>")
        if multi:
            _html_table(parts, _aggregate_columns(agrp), agrp, ids)
            tl = _tau_lines(tau, dataset, arch, structure)
            if tl:
                parts.append("<p>Agreement of the seeds' method rankings (by AA %):</p><ul>")
                parts += [f"<li>{e(l[2:])}</li>" for l in tl]
                parts.append("</ul>")
            parts.append("<details><summary>per-seed rows</summary>")
        _html_table(parts, _table_columns(grp), grp, ids)
        if multi:
            parts.append("</details>")
    if images:
        parts.append("<h2>Plots</h2><div class='plots'>")
        for img in images:
            if image_root is not None and (Path(image_root) / img).is_file():
                parts.append(f"<p>{_img_tag(Path(image_root) / img, img)}</p>")
            else:
                parts.append(f"<p><img alt='{e(img)}' src='{e(img)}'></p>")
        parts.append("</div>")
    notes = _notes(rows)
    if notes:
        parts.append("<h2>Method notes (differences from the authors' code; docs/methods.md)</h2><ul class='note'>")
        parts += [f"<li><b>{e(m)}</b>: {_md_inline(n)}</li>" for m, n in notes]
        parts.append("</ul>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------- plots
def _errorbar_x(n_methods: int, i: int, width: float = 0.7) -> float:
    """Offset of method ``i`` of ``n_methods`` inside one category (points side by side)."""
    if n_methods <= 1:
        return 0.0
    return -width / 2 + width * i / (n_methods - 1)


def write_plots(records: Iterable[Dict[str, Any]], out_dir) -> List[Path]:
    """PNG plots per (dataset, arch, structure), from seed means:

    * ``robust_vs_sparsity_*``: AA % per method, sparsity as categories, error bars = std over
      seeds, the dense reference's mean (and the dense base's) as horizontal lines;
    * ``security_curves_*``: FMN security curves, one panel per sparsity, the seed-mean curve of
      every method and of the dense reference;
    * ``speedup_vs_sparsity_*``: measured CPU speedup at the preset's batch and at batch 1 (IQR
      error bars) next to the ideal speedup of the kept multiply-adds;
    * ``pareto_*``: AA % against measured speedup, one panel per sparsity, with the Pareto front
      (no other method both faster and more robust) and the dense reference at 1x.

    Every method has one colour and one legend entry, outside the axes.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = leaderboard_rows(records)
    agg = aggregate_rows(rows)
    written: List[Path] = []
    methods = sorted({r["method"] for r in agg if not _is_ref(r["method"])})
    cmap = plt.get_cmap("tab20")
    color = {m: cmap(i % 20) for i, m in enumerate(methods)}
    markers = "osD^v<>pPX*h"
    marker = {m: markers[i % len(markers)] for i, m in enumerate(methods)}

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        plt.close(fig)
        written.append(atomic_write_bytes(out_dir / name, buf.getvalue()))

    def legend_right(fig, ax_or_axes, extra=()):
        handles, labels = {}, []
        for ax in (ax_or_axes if isinstance(ax_or_axes, (list, tuple)) else [ax_or_axes]):
            for h, l in zip(*ax.get_legend_handles_labels()):
                if l not in handles:
                    handles[l] = h
                    labels.append(l)
        fig.tight_layout(rect=(0, 0, 0.83, 0.94))
        fig.legend([handles[l] for l in labels], labels, loc="center left", bbox_to_anchor=(0.835, 0.5),
                   fontsize=8, frameon=False)

    # Security curves of every seed, by (dataset, arch, structure, method, sparsity).
    curves: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in _latest(records):
        c = (r.get("min_norm") or {}).get("security_curve")
        if c:
            curves.setdefault((r["dataset"], r["arch"], r["method"], float(r["sparsity"])), []).append(c)

    def mean_curve(key):
        cs = curves.get(key) or []
        if not cs:
            return None
        eps = cs[0]["eps"]
        cs = [c for c in cs if c["eps"] == eps]
        return eps, [100 * sum(c["robust_accuracy"][i] for c in cs) / len(cs) for i in range(len(eps))], len(cs)

    for (dataset, arch, structure), grp, agrp, (sps, prows, summary), _ in _sections(list(records)):
        mrows = [r for r in agrp if not _is_ref(r["method"])]
        if not mrows:
            continue
        tag = f"{dataset}_{arch}_{structure}".replace("/", "_")
        refs = {r["method"]: r for r in agrp if _is_ref(r["method"])}
        ms = [m for m in methods if any(r["method"] == m for r in mrows)]
        xs = {s: i for i, s in enumerate(sps)}
        cat = [f"{100 * s:g} %" for s in sps]
        cfg = _cfg(list(records))

        # 1. robust accuracy vs sparsity: seed means, std error bars, categories, dense means.
        fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
        for i, m in enumerate(ms):
            pts = sorted((r["sparsity"], r["aa_acc"], r.get("aa_acc_std")) for r in mrows
                         if r["method"] == m and r["aa_acc"] is not None)
            if not pts:
                continue
            ax.errorbar([xs[s] + _errorbar_x(len(ms), i) for s, _, _ in pts], [100 * a for _, a, _ in pts],
                        yerr=[100 * (sd or 0.0) for _, _, sd in pts], marker=marker[m], linestyle="-",
                        linewidth=0.8, color=color[m], capsize=2, markersize=5, label=m)
        for name, style in ((DENSE, "--"), (DENSE_BASE, ":")):
            d = refs.get(name)
            if d and d["aa_acc"] is not None:
                ax.axhline(100 * d["aa_acc"], color="k", linestyle=style, linewidth=1.2,
                           label=f"{name} (mean of {len(d['seeds'])} seed(s))")
        ax.set_xticks(range(len(sps)), cat)
        ax.set_xlim(-0.6, len(sps) - 0.4)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("AutoAttack robust accuracy (%)")
        nseeds = len({r["seed"] for r in grp})
        ax.set_title(f"{dataset} / {arch} / {structure}: AA % (mean" + (f" ± std over {nseeds} seeds)" if nseeds > 1 else ")"))
        ax.grid(alpha=0.3, axis="y")
        legend_right(fig, ax)
        save(fig, f"robust_vs_sparsity_{tag}.png")

        # 2. security curves: one panel per sparsity, seed-mean curves, one legend.
        fig, axes = plt.subplots(1, len(sps), figsize=(4.0 * len(sps) + 1.5, 3.8), dpi=110, squeeze=False)
        axl = list(axes[0])
        for ax, s in zip(axl, sps):
            for m in ms:
                mc = mean_curve((dataset, arch, m, s))
                if mc:
                    ax.plot(mc[0], mc[1], color=color[m], linewidth=1.1, label=m)
            mc = mean_curve((dataset, arch, DENSE, 0.0))
            if mc:
                ax.plot(mc[0], mc[1], "k--", linewidth=1.4, label="dense")
            if cfg.get("eps"):
                ax.axvline(cfg["eps"], color="gray", linewidth=0.8, linestyle=":")
            ax.set_title(f"sparsity {100 * s:g} %")
            ax.set_xlabel(f"eps ({cfg.get('norm', '')})")
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
        axl[0].set_ylabel("robust accuracy (%)")
        legend_right(fig, axl)
        fig.suptitle(f"FMN security curves (seed means): {dataset} / {arch} / {structure}; dotted line: eps of AA")
        save(fig, f"security_curves_{tag}.png")

        # 3. speedup: measured (batch N and batch 1, IQR) next to the ideal of the kept MACs.
        if any(r["cpu_speedup"] is not None for r in mrows):
            batch = next((r["latency_batch"] for r in mrows if r.get("latency_batch")), "N")
            fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), dpi=110, sharey=True)
            for ax, key, label in ((axes[0], "cpu_speedup", f"batch {batch}"), (axes[1], "b1_speedup", "batch 1")):
                for i, m in enumerate(ms):
                    pts = sorted((r["sparsity"], r[key], r.get(key + "_q25"), r.get(key + "_q75")) for r in mrows
                                 if r["method"] == m and r[key] is not None)
                    if not pts:
                        continue
                    x = [xs[s] + _errorbar_x(len(ms), i) for s, _, _, _ in pts]
                    y = [v for _, v, _, _ in pts]
                    lo = [max(0.0, v - (q if q is not None else v)) for _, v, q, _ in pts]
                    hi = [max(0.0, (q if q is not None else v) - v) for _, v, _, q in pts]
                    ax.errorbar(x, y, yerr=[lo, hi], marker=marker[m], linestyle="none", color=color[m],
                                capsize=2, markersize=5, label=m)
                ideal = {}
                for r in mrows:
                    if r["ideal_speedup"] is not None:
                        ideal.setdefault(r["sparsity"], []).append(r["ideal_speedup"])
                if ideal:
                    ax.scatter([xs[s] for s in ideal], [_median(v) for v in ideal.values()], marker="_", s=900,
                               color="k", linewidths=2, label="ideal: dense MACs / kept MACs (median)", zorder=3)
                ax.axhline(1.0, color="k", linewidth=0.8)
                ax.set_xticks(range(len(sps)), cat)
                ax.set_xlim(-0.6, len(sps) - 0.4)
                ax.set_xlabel("sparsity")
                ax.set_title(f"{label}")
                ax.set_yscale("log")
                ax.grid(alpha=0.3, axis="y", which="both")
            axes[0].set_ylabel("CPU speedup over the deployed dense model (x, log)")
            legend_right(fig, list(axes))
            fig.suptitle(f"{dataset} / {arch} / {structure}: measured speedup (median over seeds, error bars: "
                         "IQR of per-round ratios) and the ideal of the kept multiply-adds")
            save(fig, f"speedup_vs_sparsity_{tag}.png")

            # 4. Pareto: robustness vs measured speedup, one panel per sparsity.
            fig, axes = plt.subplots(1, len(sps), figsize=(4.3 * len(sps) + 1.5, 4.2), dpi=110, squeeze=False)
            axl = list(axes[0])
            dense = refs.get(DENSE)
            for ax, s in zip(axl, sps):
                pts = [(r["cpu_speedup"], 100 * r["aa_acc"], r) for r in mrows
                       if r["sparsity"] == s and r["cpu_speedup"] is not None and r["aa_acc"] is not None]
                for x, y, r in pts:
                    lo = max(0.0, x - (r["cpu_speedup_q25"] if r["cpu_speedup_q25"] is not None else x))
                    hi = max(0.0, (r["cpu_speedup_q75"] if r["cpu_speedup_q75"] is not None else x) - x)
                    ax.errorbar([x], [y], xerr=[[lo], [hi]], yerr=[100 * (r.get("aa_acc_std") or 0.0)],
                                marker=marker[r["method"]], color=color[r["method"]], capsize=2, markersize=6,
                                linestyle="none", label=r["method"])
                # Pareto front: sorted by speedup, keep the points more robust than every faster one.
                front, best = [], -1.0
                for x, y, r in sorted(pts, key=lambda p: (-p[0], -p[1])):
                    if y > best:
                        front.append((x, y, r["method"]))
                        best = y
                if front:
                    front.sort()
                    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="gray",
                            linewidth=1, alpha=0.7, label="Pareto front")
                    for x, y, m in front:
                        ax.annotate(m, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
                if dense and dense["aa_acc"] is not None:
                    ax.scatter([1.0], [100 * dense["aa_acc"]], marker="*", s=160, color="k", zorder=4,
                               label="dense (1x)")
                ax.set_title(f"sparsity {100 * s:g} %")
                ax.set_xlabel("measured CPU speedup (x)")
                ax.grid(alpha=0.3)
            axl[0].set_ylabel("AutoAttack robust accuracy (%)")
            legend_right(fig, axl)
            fig.suptitle(f"Robustness vs speed (seed means; up and right is better): {dataset} / {arch} / {structure}")
            save(fig, f"pareto_{tag}.png")
    return written


def write_leaderboard(records: Iterable[Dict[str, Any]], out_dir, *, plots: bool = True) -> Dict[str, str]:
    """Write ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard.html`` (and plots) atomically.

    Returns:
        kind -> path of what was written.
    """
    records = list(records)
    out_dir = Path(out_dir)
    files: Dict[str, str] = {}
    images: List[str] = []
    if plots and records:
        pngs = write_plots(records, out_dir / "plots")
        images = [str(p.relative_to(out_dir)) for p in pngs]
        files["plots"] = str(out_dir / "plots")
    files["markdown"] = str(atomic_write_text(out_dir / "leaderboard.md", to_markdown(records)))
    files["csv"] = str(atomic_write_text(out_dir / "leaderboard.csv", to_csv(records)))
    if not images and (out_dir / "plots").is_dir():
        images = sorted(str(p.relative_to(out_dir)) for p in (out_dir / "plots").glob("*.png"))
    files["html"] = str(atomic_write_text(out_dir / "leaderboard.html",
                                          to_html(records, images=images, image_root=out_dir)))
    return files
