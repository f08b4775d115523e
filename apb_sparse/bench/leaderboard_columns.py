"""How the leaderboard's cells read: number formats and the (header, row -> text) columns of its
tables, shared by the Markdown and HTML renderings."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

from .leaderboard_rows import DENSE_BASE, _is_ref


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


def _iqr(r, prefix="cpu_speedup") -> str:
    lo, hi = r.get(prefix + "_q25"), r.get(prefix + "_q75")
    return "-" if lo is None or hi is None else f"{lo:.2f}-{hi:.2f}"



def _gpu_columns(rows: List[Dict[str, Any]]) -> List[Tuple[str, Any]]:
    """The GPU timing columns, when any row has GPU timings."""
    if not any(r["gpu_speedup"] is not None for r in rows):
        return []
    return [("GPU dense ms", lambda r: _f(r["gpu_dense_ms"], "{:.3f}")),
            ("GPU sparse ms", lambda r: _f(r["gpu_sparse_ms"], "{:.3f}")),
            ("GPU speedup", lambda r: _f(r["gpu_speedup"], "{:.2f}x"))]

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
    cols += _gpu_columns(rows)
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
    cols += _gpu_columns(rows)
    cols += [("size dense", lambda r: _bytes(r["size_dense_bytes"])),
             ("size sparse", lambda r: _bytes(r["size_sparse_bytes"])),
             ("flags", lambda r: r["flags"] or "")]
    return cols


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


def _pivot_cell(r: Optional[Dict[str, Any]]) -> str:
    if r is None:
        return "-"
    return f"{_pct(r['clean_acc'])} / {_pct(r['aa_acc'])}"
