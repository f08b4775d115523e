"""Leaderboard of benchmark records: Markdown, CSV, static HTML and PNG plots.

One table per (dataset, architecture, structure); rows sorted by sparsity, then by robust
accuracy. The dense base model appears at the top of every table of its dataset / architecture.
Columns: method, taxonomy tags, sparsity, clean %, AutoAttack %, median min-norm distance, CPU
latency dense / sparse / speedup (and GPU when measured), model size dense / sparse (bytes of the
saved state dict), flags. There is no aggregate rank, as in APB.

Flags: ``masking?:<checks>`` (a gradient-masking check failed), ``fmn<aa`` (FMN found more
adversarial points inside eps than AutoAttack on the same images), ``sparsity!=target`` (the
pruned model misses the requested sparsity by > 0.5 points), ``sparse!=dense`` (the sparse model's
predictions differ from the dense-with-zeros model's on > 1 % of the attacked images),
``latency-output-mismatch``.
"""
from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .results import atomic_write_bytes, atomic_write_text, cell_key

__all__ = ["leaderboard_rows", "aggregate_rows", "seed_rank_agreement", "to_markdown", "to_csv", "to_html",
           "write_leaderboard", "write_plots", "COLUMNS"]

DENSE = "dense"
COLUMNS = ("dataset", "arch", "structure", "method", "pipeline", "training", "schedule", "structures",
           "locality", "criterion", "seed", "sparsity", "measured_sparsity", "clean_acc", "aa_acc",
           "median_min_norm", "cpu_dense_ms", "cpu_sparse_ms", "cpu_speedup", "cpu_speedup_q25",
           "cpu_speedup_q75", "cpu_speedup_min", "cpu_speedup_max", "cpu_dense_eager_ms",
           "cpu_speedup_vs_eager", "cpu_sparse_ms_q25", "cpu_sparse_ms_q75", "latency_rounds", "latency_phase",
           "gpu_dense_ms", "gpu_sparse_ms", "gpu_speedup", "gpu_speedup_q25", "gpu_speedup_q75",
           "size_dense_bytes", "size_sparse_bytes", "role", "flags", "notes")


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


def leaderboard_rows(records: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Flat rows (the CSV columns) from result records; the last record of a cell wins.

    Dense rows (method "dense", structure "none") are repeated into every structure present for
    their dataset / architecture / seed, so each table carries its reference.
    """
    recs = _latest(records)
    structures: Dict[Tuple[str, str], set] = {}
    for r in recs:
        if r["method"] != DENSE:
            structures.setdefault((r["dataset"], r["arch"]), set()).add(r["structure"])
    rows = []
    for r in recs:
        tags = r.get("tags") or {}
        lat = r.get("latency") or {}
        cpu, gpu = lat.get("cpu") or {}, lat.get("cuda") or {}
        size = r.get("size_bytes") or {}
        base = {
            "dataset": r["dataset"], "arch": r["arch"], "structure": r["structure"], "method": r["method"],
            "pipeline": tags.get("pipeline", ""), "training": "/".join(tags.get("training", ()) or ()),
            "schedule": tags.get("schedule") or "", "structures": "+".join(tags.get("structure", ()) or ()),
            "locality": "+".join(tags.get("locality", ()) or ()), "criterion": tags.get("criterion", ""),
            "seed": int(r["seed"]), "sparsity": float(r["sparsity"]),
            "measured_sparsity": _num(r.get("measured_sparsity")),
            "clean_acc": _num(r.get("clean_accuracy")), "aa_acc": _num(r.get("robust_accuracy")),
            "median_min_norm": _num((r.get("min_norm") or {}).get("median_distance")),
            "cpu_dense_ms": _num(cpu.get("dense_ms")), "cpu_sparse_ms": _num(cpu.get("sparse_ms")),
            "cpu_speedup": _num(cpu.get("speedup")), "cpu_speedup_q25": _num(cpu.get("speedup_q25")),
            "cpu_speedup_q75": _num(cpu.get("speedup_q75")), "cpu_speedup_min": _num(cpu.get("speedup_min")),
            "cpu_speedup_max": _num(cpu.get("speedup_max")), "cpu_dense_eager_ms": _num(cpu.get("dense_eager_ms")),
            "cpu_speedup_vs_eager": _num(cpu.get("speedup_vs_eager")),
            "cpu_sparse_ms_q25": _num(cpu.get("sparse_ms_q25")), "cpu_sparse_ms_q75": _num(cpu.get("sparse_ms_q75")),
            "latency_rounds": cpu.get("rounds"), "latency_phase": cpu.get("phase", "in-cell" if cpu else None),
            "gpu_dense_ms": _num(gpu.get("dense_ms")),
            "gpu_sparse_ms": _num(gpu.get("sparse_ms")), "gpu_speedup": _num(gpu.get("speedup")),
            "gpu_speedup_q25": _num(gpu.get("speedup_q25")), "gpu_speedup_q75": _num(gpu.get("speedup_q75")),
            "size_dense_bytes": size.get("dense"), "size_sparse_bytes": size.get("sparse"),
            "role": r.get("role") or ("" if r["method"] != DENSE else "dense base"),
            "flags": " ".join(r.get("flags") or []),
            "notes": tags.get("notes", ""),
        }
        if r["method"] == DENSE:
            for s in sorted(structures.get((r["dataset"], r["arch"]), {"unstructured"})):
                rows.append(dict(base, structure=s))
        else:
            rows.append(base)

    def order(row):
        aa = row["aa_acc"] if row["aa_acc"] is not None else -1.0
        return (row["dataset"], row["arch"], row["structure"], row["method"] != DENSE, row["sparsity"],
                -aa, row["method"], row["seed"])
    return sorted(rows, key=order)


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


def _taxonomy(row) -> str:
    if row["method"] == DENSE:
        return "dense reference (AT, same epoch budget)" if "reference" in (row.get("role") or "") \
            else "dense base (AT)"
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


def _table_columns(rows: List[Dict[str, Any]]) -> List[Tuple[str, Any]]:
    """(header, row -> cell) of the per-seed tables; GPU and seed columns only when present."""
    multi_seed = len({r["seed"] for r in rows}) > 1
    gpu = any(r["gpu_speedup"] is not None for r in rows)
    cols: List[Tuple[str, Any]] = [("method", lambda r: r["method"]), ("taxonomy", _taxonomy)]
    if multi_seed:
        cols.append(("seed", lambda r: str(r["seed"])))
    cols += [("sparsity %", lambda r: f"{100 * r['sparsity']:.1f}"),
             ("measured %", lambda r: _pct(r["measured_sparsity"])),
             ("clean %", lambda r: _pct(r["clean_acc"])),
             ("AA %", lambda r: _pct(r["aa_acc"])),
             ("median min-norm", lambda r: _f(r["median_min_norm"])),
             ("CPU dense ms", lambda r: _f(r["cpu_dense_ms"], "{:.2f}")),
             ("CPU sparse ms", lambda r: _f(r["cpu_sparse_ms"], "{:.2f}")),
             ("CPU speedup", lambda r: _f(r["cpu_speedup"], "{:.2f}x")),
             ("speedup IQR", _iqr)]
    if gpu:
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
    std of the accuracies and distances, median of the latencies and speedups, the widest
    interquartile range of the per-round speedups, union of the flags."""
    by: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["dataset"], r["arch"], r["structure"], r["method"], r["sparsity"]), []).append(r)
    out = []
    for (dataset, arch, structure, method, sparsity), grp in by.items():
        a = dict(grp[0])
        a["seeds"] = sorted(r["seed"] for r in grp)
        for k in ("clean_acc", "aa_acc", "median_min_norm", "measured_sparsity"):
            a[k], a[k + "_std"], _ = _mean_std([r[k] for r in grp])
        for k in ("cpu_dense_ms", "cpu_sparse_ms", "cpu_speedup", "cpu_speedup_vs_eager", "gpu_dense_ms",
                  "gpu_sparse_ms", "gpu_speedup", "size_dense_bytes", "size_sparse_bytes"):
            a[k] = _median([r[k] for r in grp])
        q25 = [r["cpu_speedup_q25"] for r in grp if r["cpu_speedup_q25"] is not None]
        q75 = [r["cpu_speedup_q75"] for r in grp if r["cpu_speedup_q75"] is not None]
        a["cpu_speedup_q25"] = min(q25) if q25 else None
        a["cpu_speedup_q75"] = max(q75) if q75 else None
        a["flags"] = " ".join(sorted({f for r in grp for f in (r["flags"] or "").split()}))
        out.append(a)

    def order(row):
        aa = row["aa_acc"] if row["aa_acc"] is not None else -1.0
        return (row["dataset"], row["arch"], row["structure"], row["method"] != DENSE, row["sparsity"], -aa,
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
    gpu = any(r["gpu_speedup"] is not None for r in rows)
    cols: List[Tuple[str, Any]] = [
        ("method", lambda r: r["method"]), ("taxonomy", _taxonomy),
        ("seeds", lambda r: str(len(r["seeds"]))),
        ("sparsity %", lambda r: f"{100 * r['sparsity']:.1f}"),
        ("measured %", lambda r: _pct(r["measured_sparsity"])),
        ("clean %", lambda r: _pm(r["clean_acc"], r["clean_acc_std"])),
        ("AA %", lambda r: _pm(r["aa_acc"], r["aa_acc_std"])),
        ("median min-norm", lambda r: _pm(r["median_min_norm"], r["median_min_norm_std"], 1.0, "{:.3f}")),
        ("CPU dense ms", lambda r: _f(r["cpu_dense_ms"], "{:.2f}")),
        ("CPU sparse ms", lambda r: _f(r["cpu_sparse_ms"], "{:.2f}")),
        ("CPU speedup", lambda r: _f(r["cpu_speedup"], "{:.2f}x")),
        ("speedup IQR", _iqr),
        ("vs eager dense", lambda r: _f(r["cpu_speedup_vs_eager"], "{:.2f}x"))]
    if gpu:
        cols += [("GPU speedup", lambda r: _f(r["gpu_speedup"], "{:.2f}x"))]
    cols += [("size sparse", lambda r: _bytes(r["size_sparse_bytes"])), ("flags", lambda r: r["flags"] or "")]
    return cols


# ----------------------------------------------------------------------------------- text
def _how_to_read(records: List[Dict[str, Any]], rows: List[Dict[str, Any]]) -> List[str]:
    """The "how to read this" block: what the columns compare, in the records' own terms."""
    if not records:
        return []
    r = records[0]
    cfg = (r.get("config") or {}).get("preset") or {}
    aa = next(((x.get("autoattack") or {}).get("attack") for x in records if x.get("autoattack")), "?")
    lat = next(((x.get("latency") or {}).get("cpu") for x in records if (x.get("latency") or {}).get("cpu")), {})
    seeds = sorted({row["seed"] for row in rows})
    eps = _f(cfg.get("eps"), "{:.4g}")
    lines = ["**How to read this**", ""]
    if cfg.get("attack") == "standard":
        lines.append(f"- **AA %**: robust accuracy under AutoAttack version 'standard', {cfg.get('norm')} "
                     f"eps={eps}, on the first {cfg.get('aa_samples')} test images.")
    else:
        lines.append(f"- **AA %**: robust accuracy under a *custom AutoAttack subset*, cheaper than AutoAttack "
                     f"'standard' (`{aa}`: APGD-CE, then APGD-T on the points still robust), {cfg.get('norm')} "
                     f"eps={eps}, on the first {cfg.get('aa_samples')} test images. It is an upper bound of the "
                     "robust accuracy 'standard' would report; compare methods with each other, not with papers.")
    total = None
    if cfg:
        total = (cfg.get("base_epochs") or 0) + (cfg.get("prune_epochs") or 0) + (cfg.get("finetune_epochs") or 0)
    lines.append(f"- **dense** row: a dense model adversarially trained with the same total epoch budget as "
                 f"every method ({total} epochs)" + ("" if total is None else "; pipeline-A methods start "
                 f"from a {cfg.get('base_epochs')}-epoch dense base, then prune and finetune") + ".")
    if lat:
        exclusive = lat.get("phase") == "exclusive"
        lines.append(f"- **CPU speedup**: latency of the dense model over the latency of the method's sparse "
                     f"model, both deployed the same way (`apb_sparse.sparsify(model, fuse=True)`: BatchNorm folded, "
                     f"ReLU fused; the dense one on the dense path), so it is what the sparsity alone buys; "
                     f"batch {lat.get('batch')}, {lat.get('threads') or '?'} thread(s), median of {lat.get('rounds')} rounds"
                     + (" of process CPU time (one thread: the time slices the OS gave to other jobs are left "
                        "out; on an idle machine it equals the wall time). " if lat.get("clock") == "process CPU time"
                        else " of wall-clock time. ")
                     + ("All deployed models of the run and the dense baseline were timed in **one exclusive phase** "
                        "after training, interleaved round by round, with no cell training on the machine."
                        if exclusive else "Timed inside each cell (older run: concurrent work may disturb it)."))
        lines.append("- **speedup IQR** (and the error bars of the speedup plot): the interquartile range of the "
                     "per-round ratios dense / sparse, both timed in the same round; **vs eager dense**: the "
                     "speedup over the dense model run by eager torch with BatchNorm unfolded (it includes what "
                     "folding and fusion buy).")
    if len(seeds) > 1:
        lines.append(f"- **± **: mean ± sample standard deviation over the {len(seeds)} seeds {seeds} "
                     "(different initialisation, data order and attack randomness). **Kendall tau**: agreement "
                     "of two seeds' rankings of the methods by AA % at one sparsity (1 = the same order, "
                     "0 = unrelated); a low tau means that the ranking at that sparsity is mostly noise.")
    else:
        lines.append("- one seed: differences of a few points between methods can be noise; run several "
                     "(`--seeds 0 1 2`) to see the spread and the agreement of the rankings.")
    return lines + [""]


def _protocol_lines(records: List[Dict[str, Any]]) -> List[str]:
    """What was measured, from the records' own config and environment."""
    if not records:
        return []
    r = records[0]
    cfg = (r.get("config") or {}).get("preset") or {}
    env = r.get("environment") or {}
    aa = (r.get("autoattack") or {}).get("attack", "?")
    mn = r.get("min_norm") or {}
    lat = next(((x.get("latency") or {}).get("cpu") for x in records if (x.get("latency") or {}).get("cpu")), {})
    executor = (r.get("config") or {}).get("executor")
    lines = []
    if cfg:
        lines.append(f"- preset `{cfg.get('name')}`: {cfg.get('description', '')}")
        lines.append(f"- recipe: dense base {cfg.get('base_epochs')} epochs of {cfg.get('recipe', {}).get('mode', 'pgd').upper()} "
                     f"adversarial training ({cfg.get('norm')} eps={_f(cfg.get('eps'), '{:.4g}')}, "
                     f"{cfg.get('recipe', {}).get('steps')} steps); every method gets the same budget "
                     f"(pipeline A: base + {cfg.get('prune_epochs')} prune + {cfg.get('finetune_epochs')} "
                     f"finetune epochs; B/D: the same total from scratch)")
        if cfg.get("attack") == "standard":
            lines.append(f"- AA %: AutoAttack version 'standard', {cfg.get('norm')} eps={_f(cfg.get('eps'), '{:.4g}')}, "
                         f"first {cfg.get('aa_samples')} test images")
        else:
            lines.append(f"- AA %: **custom AutoAttack subset, cheaper than 'standard'** (`{aa}`), "
                         f"{cfg.get('norm')} eps={_f(cfg.get('eps'), '{:.4g}')}, first {cfg.get('aa_samples')} test images")
        lines.append(f"- median min-norm: median per-image {cfg.get('norm')} distance found by FMN "
                     f"({cfg.get('fmn_steps')} steps) on the first {mn.get('n_samples', cfg.get('fmn_samples'))} test images "
                     f"(0 for clean errors); gradient-masking checks on {cfg.get('check_samples')} images")
    if lat:
        phase = ("one exclusive phase after training (no cell running), all deployed models interleaved"
                 if lat.get("phase") == "exclusive" else "inside each cell")
        lines.append(f"- latency: timed in {phase}; batch {lat.get('batch')}, median of {lat.get('rounds')} interleaved "
                     f"rounds ({lat.get('clock', 'wall clock')}), dense torch vs `apb_sparse.sparsify` in the same run; "
                     f"CPU {env.get('cpu', '?')}, "
                     f"{lat.get('threads') or env.get('threads', '?')} threads, kernel {env.get('apb_sparse_kernel', '?')}"
                     + (f"; GPU {env['gpu']}" if env.get("gpu") else ""))
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


def to_markdown(records: Iterable[Dict[str, Any]], *, title: str = "apb_sparse leaderboard") -> str:
    """The leaderboard as Markdown: a "how to read this" block, the protocol, and one table per
    dataset / arch / structure (mean ± std over seeds and the Kendall tau between seeds' rankings
    when there are several seeds; then the per-seed rows)."""
    records = list(records)
    rows = leaderboard_rows(records)
    out = [f"# {title}", ""]
    out += _how_to_read(records, rows)
    out += _protocol_lines(records)
    multi = len({r["seed"] for r in rows}) > 1
    tau = seed_rank_agreement(rows) if multi else []
    agg = aggregate_rows(rows) if multi else []
    for (dataset, arch, structure), grp in _groups(rows):
        out += ["", f"## {dataset} / {arch} / {structure}", ""]
        if multi:
            agrp = [r for r in agg if (r["dataset"], r["arch"], r["structure"]) == (dataset, arch, structure)]
            cols = _aggregate_columns(agrp)
            out.append("| " + " | ".join(h for h, _ in cols) + " |")
            out.append("|" + "|".join("---" for _ in cols) + "|")
            for r in agrp:
                out.append("| " + " | ".join(str(fn(r)).replace("|", "/") for _, fn in cols) + " |")
            tl = _tau_lines(tau, dataset, arch, structure)
            if tl:
                out += ["", "Agreement of the seeds' method rankings (by AA %):", ""] + tl
            out += ["", f"<details><summary>per-seed rows</summary>", ""]
        cols = _table_columns(grp)
        out.append("| " + " | ".join(h for h, _ in cols) + " |")
        out.append("|" + "|".join("---" for _ in cols) + "|")
        for r in grp:
            out.append("| " + " | ".join(str(fn(r)).replace("|", "/") for _, fn in cols) + " |")
        if multi:
            out += ["", "</details>"]
    notes = sorted({(r["method"], r["notes"]) for r in rows if r.get("notes")})
    if notes:
        out += ["", "## Method notes (differences from the authors' code; docs/methods.md)", ""]
        out += [f"- **{m}**: {n}" for m, n in notes]
    if not rows:
        out.append("(no results yet)")
    return "\n".join(out) + "\n"


def to_csv(records: Iterable[Dict[str, Any]]) -> str:
    """All rows with raw numbers (fractions, milliseconds, bytes), one per cell and seed."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in leaderboard_rows(records):
        w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    return buf.getvalue()


def _html_table(parts: List[str], cols, grp) -> None:
    e = html.escape
    parts.append("<table><tr>")
    parts += [f"<th>{e(h)}</th>" for h, _ in cols]
    parts.append("</tr>")
    for r in grp:
        parts.append(f"<tr class='{'dense' if r['method'] == DENSE else ''}'>")
        for h, fn in cols:
            cls = " class='flag'" if h == "flags" else ""
            parts.append(f"<td{cls}>{e(str(fn(r)))}</td>")
        parts.append("</tr>")
    parts.append("</table>")


def _md_inline(text: str) -> str:
    """The little Markdown of our own lines (**bold**, *em*, `code`) as HTML."""
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    t = re.sub(r"\*(.+?)\*", r"<i>\1</i>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def to_html(records: Iterable[Dict[str, Any]], *, title: str = "apb_sparse leaderboard",
            images: Sequence[str] = ()) -> str:
    """A static HTML page: the how-to-read block, the tables and the plots."""
    records = list(records)
    rows = leaderboard_rows(records)
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,td:nth-child(2){text-align:left}"
             "th{background:#eee}tr.dense{background:#f6f6f6;font-style:italic}.flag{color:#b00}"
             ".read{background:#f4f8ff;border:1px solid #cde;padding:0.5em 1em}</style></head><body>",
             f"<h1>{e(title)}</h1>"]
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
    agg = aggregate_rows(rows) if multi else []
    for (dataset, arch, structure), grp in _groups(rows):
        parts.append(f"<h2>{e(dataset)} / {e(arch)} / {e(structure)}</h2>")
        if multi:
            agrp = [r for r in agg if (r["dataset"], r["arch"], r["structure"]) == (dataset, arch, structure)]
            _html_table(parts, _aggregate_columns(agrp), agrp)
            tl = _tau_lines(tau, dataset, arch, structure)
            if tl:
                parts.append("<p>Agreement of the seeds' method rankings (by AA %):</p><ul>")
                parts += [f"<li>{e(l[2:])}</li>" for l in tl]
                parts.append("</ul>")
            parts.append("<details><summary>per-seed rows</summary>")
        _html_table(parts, _table_columns(grp), grp)
        if multi:
            parts.append("</details>")
    for img in images:
        parts.append(f"<p><img src='{e(img)}' style='max-width:900px'></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------- plots
def write_plots(records: Iterable[Dict[str, Any]], out_dir) -> List[Path]:
    """robust accuracy vs sparsity (per method), security curves, speedup vs sparsity (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recs = _latest(records)
    written: List[Path] = []
    methods = sorted({r["method"] for r in recs if r["method"] != DENSE})
    cmap = plt.get_cmap("tab20")
    color = {m: cmap(i % 20) for i, m in enumerate(methods)}

    def save(fig, name):
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
        written.append(atomic_write_bytes(out_dir / name, buf.getvalue()))

    by_group: Dict[Tuple[str, str, str], List[Dict[str, Any]]] = {}
    dense: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in recs:
        if r["method"] == DENSE:
            dense.setdefault((r["dataset"], r["arch"]), []).append(r)
        else:
            by_group.setdefault((r["dataset"], r["arch"], r["structure"]), []).append(r)

    for (dataset, arch, structure), grp in sorted(by_group.items()):
        tag = f"{dataset}_{arch}_{structure}".replace("/", "_")
        # 1. robust accuracy vs sparsity
        fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
        for m in sorted({r["method"] for r in grp}):
            pts = sorted((r["sparsity"], _num(r.get("robust_accuracy"))) for r in grp if r["method"] == m)
            pts = [(s, a) for s, a in pts if a is not None]
            if pts:
                ax.plot([100 * s for s, _ in pts], [100 * a for _, a in pts], marker="o", label=m, color=color[m])
        for d in dense.get((dataset, arch), [])[:1]:
            ax.axhline(100 * d["robust_accuracy"], color="k", linestyle="--", linewidth=1, label="dense")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("AutoAttack robust accuracy (%)")
        ax.set_title(f"{dataset} / {arch} / {structure}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        save(fig, f"robust_vs_sparsity_{tag}.png")

        # 2. security curves, one panel per sparsity
        sps = sorted({r["sparsity"] for r in grp})
        fig, axes = plt.subplots(1, len(sps), figsize=(4.2 * len(sps), 3.6), dpi=110, squeeze=False)
        for ax, s in zip(axes[0], sps):
            for r in sorted((r for r in grp if r["sparsity"] == s), key=lambda r: r["method"]):
                curve = (r.get("min_norm") or {}).get("security_curve")
                if curve:
                    ax.plot(curve["eps"], [100 * a for a in curve["robust_accuracy"]], label=r["method"],
                            color=color[r["method"]])
            for d in dense.get((dataset, arch), [])[:1]:
                curve = (d.get("min_norm") or {}).get("security_curve")
                if curve:
                    ax.plot(curve["eps"], [100 * a for a in curve["robust_accuracy"]], "k--", label="dense")
            eps = ((grp[0].get("config") or {}).get("preset") or {}).get("eps")
            if eps:
                ax.axvline(eps, color="gray", linewidth=0.8, linestyle=":")
            ax.set_title(f"sparsity {100 * s:.0f} %")
            ax.set_xlabel("eps")
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("robust accuracy (%)")
        axes[0][-1].legend(fontsize=6, ncol=2)
        fig.suptitle(f"FMN security curves: {dataset} / {arch} / {structure}")
        save(fig, f"security_curves_{tag}.png")

    # 3. speedup vs sparsity, per dataset / arch, both structures
    by_da: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for (dataset, arch, _), grp in by_group.items():
        by_da.setdefault((dataset, arch), []).extend(grp)
    for (dataset, arch), grp in sorted(by_da.items()):
        fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
        for m in sorted({r["method"] for r in grp}):
            for structure, marker in (("unstructured", "o"), ("filter", "s")):
                # Over seeds: the median speedup, and as error bar the widest interquartile range
                # of the per-round ratios (dense and sparse timed in the same round).
                per_s: Dict[float, List[Dict[str, Any]]] = {}
                for r in grp:
                    cpu = (r.get("latency") or {}).get("cpu") or {}
                    if r["method"] == m and r["structure"] == structure and _num(cpu.get("speedup")) is not None:
                        per_s.setdefault(float(r["sparsity"]), []).append(cpu)
                if not per_s:
                    continue
                xs = sorted(per_s)
                ys = [_median([_num(c["speedup"]) for c in per_s[s]]) for s in xs]
                lo = [min((_num(c.get("speedup_q25")) or y) for c in per_s[s]) for s, y in zip(xs, ys)]
                hi = [max((_num(c.get("speedup_q75")) or y) for c in per_s[s]) for s, y in zip(xs, ys)]
                ax.errorbar([100 * s for s in xs], ys, yerr=[[max(0.0, y - l) for y, l in zip(ys, lo)],
                                                             [max(0.0, h - y) for y, h in zip(ys, hi)]],
                            marker=marker, linestyle="-", color=color[m], alpha=0.8, capsize=3,
                            label=f"{m} ({structure[:1].upper()})")
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.text(0.01, 0.01, "error bars: interquartile range of per-round dense/sparse ratios",
                transform=ax.transAxes, fontsize=6, color="gray")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("CPU speedup over dense (x)")
        ax.set_title(f"{dataset} / {arch}: measured speedup")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        save(fig, f"speedup_vs_sparsity_{dataset}_{arch}.png".replace("/", "_"))
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
    files["html"] = str(atomic_write_text(out_dir / "leaderboard.html", to_html(records, images=images)))
    return files
