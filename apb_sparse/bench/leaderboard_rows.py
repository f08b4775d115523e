"""The leaderboard's data: flat rows from result records (one per cell and seed, the CSV
columns) and what is computed from them: seed aggregates, Kendall tau between seeds, the
APB-style pivot, the optimisation budgets and the per-(dataset, arch, structure) sections."""
from __future__ import annotations

import math
from itertools import combinations
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .results import cell_key


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


def _groups(rows: List[Dict[str, Any]]) -> List[Tuple[Tuple[str, str, str], List[Dict[str, Any]]]]:
    out: Dict[Tuple[str, str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["dataset"], r["arch"], r["structure"]), []).append(r)
    return list(out.items())


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
    from scipy.stats import kendalltau  # optional ('bench' extra): imported on use

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


def _cfg(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    return next(((r.get("config") or {}).get("preset") for r in records if (r.get("config") or {}).get("preset")), {}) or {}
