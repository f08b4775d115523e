"""The leaderboard's prose, as Markdown list lines: how to read it, the protocol that produced
the records, the lines under each pivot and the seeds' rank agreement; rendered by the Markdown
and HTML pages alike."""
from __future__ import annotations

from typing import Any, Dict, List

from .leaderboard_columns import _f, _pct
from .leaderboard_rows import _cfg, _is_ref, _latest


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
                     f"fused, TorchScript graph; the dense one with `layout=\"dense\"`), so it is what the sparsity "
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
