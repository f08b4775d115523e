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

This module writes the files (:func:`write_leaderboard`) and gathers the leaderboard's public
names; each job lives in its own file: :mod:`.leaderboard_rows` (rows from records, seed
aggregates, pivot, budgets), :mod:`.leaderboard_columns` (cell formats and table columns),
:mod:`.leaderboard_text` (the prose lines), :mod:`.leaderboard_markdown` (Markdown and CSV),
:mod:`.leaderboard_html` (the HTML page) and :mod:`.leaderboard_plots` (the PNG plots).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List

# The private helpers stay importable from here as before the split (hence the noqa).
from .leaderboard_columns import (_aggregate_columns, _bytes, _f, _iqr, _pct, _pivot_cell, _pm,  # noqa: F401
                                  _ref_label, _speed_columns, _table_columns, _taxonomy)
from .leaderboard_html import _CSS, _JS, _html_table, _Ids, _img_tag, _md_inline, to_html  # noqa: F401
from .leaderboard_markdown import _budget_md, _md_table, _pivot_md, to_csv, to_markdown  # noqa: F401
from .leaderboard_plots import _errorbar_x, write_plots  # noqa: F401
from .leaderboard_rows import (COLUMNS, DENSE, DENSE_BASE, REFERENCES, _cfg, _groups, _is_ref, _latest,  # noqa: F401
                               _mean_std, _median, _notes, _num, _ref_rank, _sections, _training_ran, aggregate_rows,
                               budget_rows, leaderboard_rows, pivot_rows, seed_rank_agreement)
from .leaderboard_text import _how_to_read, _pivot_summary_lines, _protocol_lines, _tau_lines  # noqa: F401
from .results import atomic_write_text

__all__ = ["leaderboard_rows", "aggregate_rows", "seed_rank_agreement", "pivot_rows", "budget_rows",
           "to_markdown", "to_csv", "to_html", "write_leaderboard", "write_plots", "COLUMNS", "REFERENCES"]


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
