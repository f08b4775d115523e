"""The leaderboard's PNG plots (:func:`write_plots`), drawn with matplotlib."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple

from .leaderboard_rows import DENSE, DENSE_BASE, _cfg, _is_ref, _latest, _median, _sections, aggregate_rows, leaderboard_rows
from .results import atomic_write_bytes


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
    import matplotlib  # optional ('bench' extra), heavy: imported on use
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
