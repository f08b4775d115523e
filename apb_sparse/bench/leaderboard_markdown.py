"""The leaderboard as text files: ``leaderboard.md`` (:func:`to_markdown`) and ``leaderboard.csv``
(:func:`to_csv`, raw numbers)."""
from __future__ import annotations

import csv
import io
from typing import Any, Dict, Iterable, List

from .leaderboard_columns import _aggregate_columns, _f, _pivot_cell, _table_columns, _taxonomy
from .leaderboard_rows import COLUMNS, _is_ref, _notes, _sections, leaderboard_rows, seed_rank_agreement
from .leaderboard_text import _how_to_read, _pivot_summary_lines, _protocol_lines, _tau_lines


def _budget_md(brows: List[Dict[str, Any]]) -> List[str]:
    if not brows:
        return []
    out = ["| method | pipeline | phases (epochs, SGD steps, peak lr; cosine per phase) | epochs | SGD steps | sum of lr |",
           "|---|---|---|---|---|---|"]
    for b in brows:
        out.append(f"| {b['method']} | {b['pipeline']} | {b['phases']} | {_f(b['epochs'], '{:.0f}')} | "
                   f"{_f(b['steps'], '{:.0f}')} | {_f(b['lr_sum'], '{:.2f}')} |")
    return out


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
