"""The ``apb`` argument parser (:func:`build_parser`): every subcommand, option and help text."""
from __future__ import annotations

import argparse

from ..bench.presets import PRESETS
from .argtypes import _eps, _json_dict, _nonneg_float, _nonneg_int, _positive_float, _positive_int, _sparsity, _structure

#: What ``apb --help`` prints above the subcommands.
DESCRIPTION = """The ``apb`` command: adversarial pruning benchmark with robustness and measured speed.

Subcommands::

    apb run          train the dense adversarial base, prune with every method at every sparsity,
                     evaluate clean / AutoAttack / FMN min-norm (+ masking checks), sparsify,
                     time dense vs sparse, write results.jsonl, the leaderboard and plots
    apb prune        prune one model with one method and save its sparse checkpoint
    apb eval         robustness and speed of a checkpoint (ours, or a dense-with-zeros state dict)
    apb bench latency   dense vs sparse latency of an architecture at several sparsities
    apb leaderboard  rewrite leaderboard.md / .csv / .html and plots from results.jsonl
    apb taxonomy     the 26 surveyed methods in the survey's taxonomy

``apb <subcommand> --help`` explains the options.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Raw epilogs; appends "(default: X)" to option help only where X says something."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "%(default)" in h or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return h
        return h + " (default: %(default)s)"


def _preset_help() -> str:
    lines = []
    for p in PRESETS.values():
        lines.append(f"  {p.name:<7} {p.description}.")
        lines.append(f"          robust accuracy: {p.describe_attack()}.")
    return "\n".join(lines)


RUN_EPILOG = """\
what `apb run` does, per dataset / architecture / seed:
  1. adversarially train (PGD-AT) the dense base model of the pipeline-A methods once; cached in
     OUT/base/ and shared by every cell that needs it
  2. for each structure, sparsity and method (a "cell"): prune (pipeline A methods start from the
     base; B and D methods train from the same initialisation with the same total epoch budget),
     evaluate clean accuracy, AutoAttack, FMN minimum-norm distances (security curve) with
     gradient-masking checks, convert with apb_sparse.sparsify and check the sparse model agrees
     with the dense one, measure model sizes. The "dense" row is a dense model trained with that
     same total budget (same SGD steps and learning rates); "dense_base" is the base model of
     step 1, evaluated as is. Cells run concurrently with --executor ray (logs in OUT/logs/)
  3. append one JSON record per cell to OUT/results.jsonl (a rerun skips finished cells, an
     interrupted run loses nothing finished), save OUT/checkpoints/<cell>.safetensors (nonzeros
     only)
  4. time every deployed model of the run (apb_sparse.deploy, at the preset's batch and batch 1)
     against the dense model deployed the same way, in one exclusive interleaved phase on this
     machine (CPU, and GPU if present), then write OUT/leaderboard.{md,csv,html} (an APB-style
     pivot first, then budgets and every column) and OUT/plots/*.png (robustness vs sparsity,
     security curves, speedup with its ideal, robustness-vs-speedup Pareto view); docs/benchmark.md

executors:
  --executor auto (default) uses Ray when it is installed and the machine has more than one CPU,
  else the in-process loop (local). With Ray each cell is a task (--cpus-per-cell, --gpus-per-cell
  resources; --workers cells at a time); --ray-address HEAD:6379 (or auto) joins a running cluster
  (`ray start --head` on one node, `ray start --address HEAD:6379` on the others; OUT must then be
  shared storage; a head with token authentication needs its token on this machine, in
  ~/.ray/auth_token or RAY_AUTH_TOKEN; --ray-timeout bounds the connection). --executor slurm
  submits one SLURM job per cell with submitit (--slurm-partition, --slurm-time, --gpus-per-cell,
  --cpus-per-cell; job files in OUT/slurm); --slurm-local runs those jobs on this machine. A worker
  or job that dies mid-cell is retried (--max-retries); a cell that raises is recorded as failed
  (OUT/failed.jsonl, OUT/errors.log) and runs again on resume. See docs/cluster.md.

presets:
{presets}

examples:
  apb run                                   # quick preset, every method, seed 0, into runs/quick
  apb run --seeds 0 1                       # add seed 1 to the same folder: error bars, Kendall tau
  apb run --methods hydra lwm_local --sparsities 0.9 0.99
  apb run --executor ray --workers 4 --gpus-per-cell 1 --preset paper --data-dir ~/data --out runs/paper
  apb run --executor ray --ray-address auto --gpus-per-cell 1 --preset paper --out /shared/runs/paper
  apb run --executor slurm --slurm-partition gpu --gpus-per-cell 1 --slurm-time 720 --preset paper \
          --out /shared/runs/paper
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apb", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{run,prune,eval,bench,leaderboard,taxonomy}")

    # ---------------------------------------------------------------- run
    r = sub.add_parser("run", help="the benchmark: train, prune, attack, sparsify, time, leaderboard",
                       description="Run (or resume) the adversarial pruning benchmark.",
                       epilog=RUN_EPILOG.replace("{presets}", _preset_help()), formatter_class=_Formatter)
    r.add_argument("--preset", choices=("quick", "fmnist", "paper"), default="quick",
                   help="benchmark configuration (see below)")
    r.add_argument("--methods", nargs="+", metavar="M", default=None,
                   help="pruning methods (registry names, see `apb taxonomy --implemented`); default: all")
    r.add_argument("--structures", nargs="+", type=_structure, metavar="S", default=None,
                   help="'unstructured' and/or 'filter' (structured); default: the preset's")
    r.add_argument("--sparsities", nargs="+", type=_sparsity, metavar="X", default=None,
                   help="unstructured sparsities as fractions of zeros (0.9 = 90 %%); default: the preset's")
    r.add_argument("--structured-sparsities", nargs="+", type=_sparsity, metavar="X", default=None,
                   help="filter sparsities (fraction of conv weights in pruned filters); default: the preset's")
    r.add_argument("--seeds", nargs="+", type=_nonneg_int, metavar="N", default=None, help="seeds; default: 0")
    r.add_argument("--datasets", nargs="+", metavar="D", default=None, help="override the preset's datasets")
    r.add_argument("--archs", nargs="+", metavar="A", default=None, help="override the preset's architectures")
    r.add_argument("--out", default=None, help="output folder (default: runs/<preset>)")
    r.add_argument("--data-dir", default=None, help="folder with the datasets (default: apb_sparse's data dir)")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="training / attack device (default: the preset's; quick: cpu)")
    r.add_argument("--base-epochs", type=_positive_int, default=None,
                   help="epochs of the dense base (and of every method's pretraining budget)")
    r.add_argument("--aa-samples", type=_positive_int, default=None, help="test images attacked by AutoAttack")
    r.add_argument("--fmn-samples", type=_positive_int, default=None, help="test images of the FMN min-norm attack")
    r.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: the preset's; quick: 1, others: torch's)")
    r.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    r.add_argument("--executor", choices=("auto", "local", "ray", "slurm"), default="auto",
                   help="where cells run: 'local' (one after another in this process), 'ray' (Ray tasks), "
                        "'slurm' (one SLURM job per cell, through submitit), "
                        "'auto' (ray if installed and the machine has > 1 CPU, else local)")
    r.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="cells at a time with --executor ray (default: what the cluster's CPUs / GPUs hold "
                        "at --cpus-per-cell / --gpus-per-cell) or slurm (jobs queued at once, default 32)")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="an existing Ray cluster ('auto', 'HOST:6379', 'ray://HOST:10001'); default: start a "
                        "local one on this machine. A token-authenticated head (Ray >= 2.5x) needs its token "
                        "here: ~/.ray/auth_token or RAY_AUTH_TOKEN")
    r.add_argument("--ray-timeout", type=_positive_float, default=60.0, metavar="S",
                   help="seconds to reach --ray-address before failing")
    r.add_argument("--slurm-partition", default=None, metavar="P", help="SLURM partition of the cell jobs")
    r.add_argument("--slurm-time", type=_positive_int, default=24 * 60, metavar="MIN",
                   help="time limit of one cell job in minutes")
    r.add_argument("--slurm-mem-gb", type=_positive_float, default=None, metavar="GB",
                   help="memory of one cell job (default: the partition's)")
    r.add_argument("--slurm-account", default=None, metavar="A", help="SLURM account to charge")
    r.add_argument("--slurm-qos", default=None, metavar="Q", help="SLURM quality of service")
    r.add_argument("--slurm-constraint", default=None, metavar="C", help="SLURM node constraint (e.g. a GPU type)")
    r.add_argument("--slurm-folder", default=None, metavar="DIR",
                   help="submitit's job scripts and logs (default OUT/slurm; must be on shared storage)")
    r.add_argument("--slurm-local", action="store_true",
                   help="run the SLURM jobs as processes on this machine (submitit's local executor): try a "
                        "configuration without a cluster")
    r.add_argument("--cpus-per-cell", type=_positive_float, default=1.0, metavar="C",
                   help="CPUs of one cell (Ray resources; SLURM --cpus-per-task)")
    r.add_argument("--gpus-per-cell", type=_nonneg_float, default=0.0, metavar="G",
                   help="GPUs of one cell (Ray: 1 = one cell per GPU, fractions share a GPU; SLURM: whole GPUs "
                        "per job)")
    r.add_argument("--max-retries", type=_nonneg_int, default=3, metavar="N",
                   help="reruns of a cell whose Ray worker process or SLURM job died (a cell that raises is "
                        "not rerun)")
    r.add_argument("--download", action="store_true",
                   help="download missing torchvision datasets (cifar10, svhn, mnist, fashion-mnist) into "
                        "--data-dir first (needs internet)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    # ---------------------------------------------------------------- prune
    pr = sub.add_parser("prune", help="prune one model with one method, save the sparse checkpoint",
                        formatter_class=_Formatter,
                        description="Prune with one method at one sparsity (the preset's recipe) and save the "
                                    "sparsified model as OUT (.safetensors, nonzeros only, with its config). "
                                    "The dense base model is --base, or the preset's base cached in --work-dir "
                                    "(trained there if missing).")
    pr.add_argument("--method", required=True, help="pruning method (registry name)")
    pr.add_argument("--sparsity", required=True, type=_sparsity, help="fraction of zeros, e.g. 0.9")
    pr.add_argument("--structure", type=_structure, default="unstructured", help="'unstructured' or 'filter'")
    pr.add_argument("--preset", choices=("quick", "fmnist", "paper"), default="quick", help="recipe and data")
    pr.add_argument("--dataset", default=None, help="override the preset's (first) dataset")
    pr.add_argument("--arch", default=None, help="override the preset's (first) architecture")
    pr.add_argument("--seed", type=_nonneg_int, default=0, help="seed")
    pr.add_argument("--base", default=None, help="dense base checkpoint (ours, or a plain state dict)")
    pr.add_argument("--work-dir", default=None, help="where the base model is cached (default runs/<preset>)")
    pr.add_argument("--out", default=None, help="output .safetensors (default pruned-<method>-<sparsity>.safetensors)")
    pr.add_argument("--data-dir", default=None, help="dataset folder")
    pr.add_argument("--download", action="store_true",
                    help="download a missing torchvision dataset into --data-dir first (needs internet)")
    pr.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="device")
    pr.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    # ---------------------------------------------------------------- eval
    ev = sub.add_parser("eval", help="robustness and speed of a checkpoint (bring your own pruned model)",
                        formatter_class=_Formatter,
                        description="Evaluate a checkpoint: detect its sparsity, sparsify it, measure clean and "
                                    "AutoAttack accuracy, FMN min-norm distances with masking checks, dense vs "
                                    "sparse latency and sizes. FILE is an apb_sparse checkpoint (.safetensors from "
                                    "`apb run` / `apb prune`), or a plain dense-with-zeros state dict "
                                    "(.safetensors, or a torch.save file loaded with weights_only=True; never "
                                    "unpickled) for which --arch and --dataset are required. Loading is strict.")
    ev.add_argument("--checkpoint", required=True, metavar="FILE", help="the checkpoint")
    ev.add_argument("--arch", default=None,
                    help="architecture of a plain state dict: ours, robustbench:<arch> (RobustBench's key layout, "
                         "e.g. robustbench:wrn28_10) or timm:<name>")
    ev.add_argument("--dataset", default=None, help="test data (required unless the checkpoint records it)")
    ev.add_argument("--model-kwargs", type=_json_dict, default=None, metavar="JSON",
                    help="extra get_model options of a plain state dict, e.g. '{\"width\": 16}'")
    ev.add_argument("--normalize", choices=("dataset", "none"), default=None,
                    help="for a plain state dict without normalize.mean/std buffers (saved by another tool, "
                         "its normalisation outside the model): normalise inputs with the dataset's statistics "
                         "or not at all (default: 'none' for robustbench:* architectures, whose checkpoints take "
                         "[0, 1] inputs, else 'dataset')")
    ev.add_argument("--preset", choices=("quick", "fmnist", "paper"), default="quick",
                    help="evaluation settings (attack budget, samples, latency batch)")
    ev.add_argument("--attack", choices=("quick", "standard"), default=None,
                    help="'standard' AutoAttack or the cheaper custom subset 'quick' (default: the preset's)")
    ev.add_argument("--norm", choices=("Linf", "L2"), default=None, help="threat model (default: the preset's)")
    ev.add_argument("--eps", type=_eps, default=None, help="radius, e.g. 0.1 or 8/255 (default: the preset's)")
    ev.add_argument("--n-samples", type=_positive_int, default=None, help="test images attacked by AutoAttack")
    ev.add_argument("--fmn-samples", type=_positive_int, default=None, help="test images of FMN")
    ev.add_argument("--check-samples", type=_positive_int, default=None, help="images of the masking checks")
    ev.add_argument("--fmn-steps", type=_positive_int, default=None, help="FMN iterations")
    ev.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the attacks")
    ev.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    ev.add_argument("--save-sparse", default=None, metavar="FILE",
                    help="also save the sparsified model as an apb_sparse checkpoint")
    ev.add_argument("--out", default=None, metavar="JSON", help="write the full result as JSON")
    ev.add_argument("--data-dir", default=None, help="dataset folder")
    ev.add_argument("--download", action="store_true",
                    help="download a missing torchvision dataset into --data-dir first (needs internet)")
    ev.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="attack device")

    # ---------------------------------------------------------------- bench latency
    b = sub.add_parser("bench", help="micro-benchmarks (latency)", formatter_class=_Formatter,
                       description="Micro-benchmarks.")
    bsub = b.add_subparsers(dest="bench_command", metavar="{latency}")
    bl = bsub.add_parser("latency", formatter_class=_Formatter,
                         help="dense vs sparse latency of an architecture at several sparsities",
                         description="Magnitude-prune a freshly initialised architecture (or load --checkpoint), "
                                     "sparsify it, check the outputs agree, and time dense vs sparse "
                                     "(interleaved rounds, medians, speedup from the same run).")
    bl.add_argument("--arch", default="resnet18", help="architecture")
    bl.add_argument("--input-shape", nargs=3, type=_positive_int, default=None, metavar=("C", "H", "W"),
                    help="input shape (default 3 32 32; 1 8 8 for small_cnn)")
    bl.add_argument("--num-classes", type=_positive_int, default=10, help="classes")
    bl.add_argument("--model-kwargs", type=_json_dict, default=None, metavar="JSON", help="get_model options")
    bl.add_argument("--sparsities", nargs="+", type=_sparsity, default=[0.5, 0.9, 0.95, 0.99], metavar="X",
                    help="sparsities (fractions)")
    bl.add_argument("--structure", type=_structure, default="unstructured", help="'unstructured' or 'filter'")
    bl.add_argument("--batch", nargs="+", type=_positive_int, default=[1, 32], metavar="B", help="batch sizes")
    bl.add_argument("--rounds", type=_positive_int, default=10, help="timed rounds")
    bl.add_argument("--checkpoint", default=None, metavar="FILE", help="time this apb_sparse checkpoint instead")
    bl.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device")
    bl.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    bl.add_argument("--tune", action="store_true",
                    help="deploy the sparse model with tune=True (each layer's layout by measured time)")
    bl.add_argument("--out", default=None, metavar="JSON", help="write the results as JSON")

    # ---------------------------------------------------------------- leaderboard
    lb = sub.add_parser("leaderboard", help="rewrite the leaderboard and plots from results.jsonl",
                        formatter_class=_Formatter,
                        description="Read OUT/results.jsonl and write OUT/leaderboard.md, .csv, .html and "
                                    "OUT/plots/*.png; print the Markdown.")
    lb.add_argument("--out", default="runs/quick", help="the run folder holding results.jsonl")
    lb.add_argument("--results", default=None, help="a results .jsonl elsewhere (output goes next to it)")
    lb.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    # ---------------------------------------------------------------- taxonomy
    tx = sub.add_parser("taxonomy", help="the surveyed methods in the survey's taxonomy", formatter_class=_Formatter,
                        description="Print the 26 methods of the adversarial-pruning survey (Piras et al., "
                                    "arXiv 2409.01249) with their taxonomy, and which are implemented here.")
    tx.add_argument("--implemented", action="store_true", help="only methods implemented in apb_sparse.methods, "
                                                                 "plus the registry's baselines")
    tx.add_argument("--markdown", action="store_true", help="Markdown table instead of aligned text")
    tx.add_argument("--json", action="store_true", help="JSON")
    return p
