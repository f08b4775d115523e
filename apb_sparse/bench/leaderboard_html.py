"""The leaderboard as one self-contained HTML page (:func:`to_html`): sortable, filterable tables
and the plots embedded as data URIs."""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .leaderboard_columns import _aggregate_columns, _f, _pivot_cell, _table_columns, _taxonomy
from .leaderboard_rows import _is_ref, _notes, _sections, leaderboard_rows, seed_rank_agreement
from .leaderboard_text import _how_to_read, _pivot_summary_lines, _protocol_lines, _tau_lines


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
