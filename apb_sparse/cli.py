"""The ``apb`` command: adversarial pruning benchmark with robustness and measured speed.

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
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["main", "build_parser"]


# ----------------------------------------------------------------------------------- arg types
def _sparsity(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction of zeros in [0, 1), e.g. 0.9; got {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction of zeros in [0, 1), e.g. 0.9 for 90 %; got {text!r}")
    return v


def _bounded(cast, ok, expected: str):
    """An argparse ``type``: ``cast(text)`` accepted when ``ok(value)``, else "expected <expected>"."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v
    parse.__name__ = expected
    return parse


_positive_int = _bounded(int, lambda v: v > 0, "a positive integer")
_nonneg_int = _bounded(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _bounded(float, lambda v: v > 0, "a number > 0")
_nonneg_float = _bounded(float, lambda v: v >= 0, "a number >= 0")


def _eps(text: str) -> float:
    try:
        if "/" in text:
            a, b = text.split("/", 1)
            v = float(a) / float(b)
        else:
            v = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number >= 0 such as 0.1 or 8/255, got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 such as 0.1 or 8/255, got {text!r}")
    return v


def _json_dict(text: str) -> dict:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 16}}': {e}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 16}}', got {text!r}")
    return v


STRUCTURE_CHOICES = ("unstructured", "filter")


def _structure(text: str) -> str:
    aliases = {"us": "unstructured", "unstructured": "unstructured", "s": "filter", "filter": "filter",
               "filters": "filter", "structured": "filter", "channel": "filter", "channels": "filter"}
    if text.lower() not in aliases:
        raise argparse.ArgumentTypeError(f"expected 'unstructured' (US) or 'filter' (S, structured), got {text!r}")
    return aliases[text.lower()]


# ----------------------------------------------------------------------------------- parser
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Raw epilogs; appends "(default: X)" to option help only where X says something."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "%(default)" in h or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return h
        return h + " (default: %(default)s)"


def _preset_help() -> str:
    from .bench.presets import PRESETS

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
    p = argparse.ArgumentParser(prog="apb", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


# ----------------------------------------------------------------------------------- commands
def _check_methods(parser: argparse.ArgumentParser, names: Optional[Sequence[str]], flag: str) -> List[str]:
    from . import methods as registry

    avail = registry.available()
    if not names or [n.lower() for n in names] == ["all"]:
        return list(avail)
    bad = [n for n in names if n.lower() not in avail]
    if bad:
        parser.error(f"argument {flag}: unknown method(s) {bad}; expected names from {avail} (or 'all')")
    seen: List[str] = []
    for n in names:
        if n.lower() not in seen:
            seen.append(n.lower())
    return seen


def _check_names(parser, names, flag, valid):
    bad = [n for n in names if n not in valid]
    if bad:
        parser.error(f"argument {flag}: unknown name(s) {bad}; expected names from {sorted(valid)}")


class _CliError(Exception):
    """A failure to report as one ``apb: error: ...`` line (no traceback) with exit code ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int = 2):
    raise _CliError(message, code)


def _check_output(flag: str, path, *, suffix: Optional[str] = None) -> Path:
    """Fail now, before any work, if ``path`` cannot be written (missing parent that cannot be
    created, a file where a folder should be, no permission, a folder given as a file)."""
    import tempfile

    out = Path(path)
    if suffix is not None and out.suffix != suffix:
        _fail(f"argument {flag}: {str(out)!r} must end in {suffix}")
    if out.is_dir():
        _fail(f"argument {flag}: {str(out)!r} is a directory, expected a file name")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        _fail(f"argument {flag}: cannot write {str(out)!r}: {str(ancestor)!r} is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=".apb-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        _fail(f"argument {flag}: cannot write {str(out)!r}: {e.strerror or e}")
    return out


def _check_out_folder(flag: str, out: Path) -> None:
    """Fail now, as one line naming ``flag``, if ``out`` cannot be the run folder: a file, under a
    file, or a place this user cannot create or write."""
    import tempfile

    if out.exists() and not out.is_dir():
        _fail(f"argument {flag}: {str(out)!r} is a file, expected a folder (for results.jsonl, checkpoints, "
              "the leaderboard)")
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        _fail(f"argument {flag}: cannot create the folder {str(out)!r}: {str(ancestor)!r} is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".apb-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        _fail(f"argument {flag}: cannot write into {str(out)!r}: {e.strerror or e}")


def _available_memory_bytes() -> Optional[int]:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def _check_model_size(flag: str, arch: str, num_classes: int, in_channels: int, model_kwargs) -> None:
    """Refuse, naming ``flag``, options that would make ``get_model`` allocate more than this
    machine's free memory (a corrupted or hostile ``model_kwargs`` such as ``width: 1e8`` is
    otherwise a raw allocator error after a long wait). The model is built on the meta device,
    which allocates nothing."""
    import torch
    from torch.overrides import TorchFunctionMode

    from .models import get_model

    class _FactoriesOnMeta(TorchFunctionMode):
        # Parameters and buffers come from these factories; small constants built from Python
        # values (the normalisation statistics, which the model checks with .item()) stay real.
        FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.empty_like}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in self.FACTORIES:
                kwargs["device"] = "meta"
            return func(*args, **kwargs)

    try:
        with _FactoriesOnMeta():
            m = get_model(arch, num_classes=num_classes, in_channels=in_channels, **dict(model_kwargs or {}))
    except Exception:  # the real build reports its own, named errors
        return
    nbytes = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    free = _available_memory_bytes()
    limit = max(free // 2, 1 << 30) if free else 1 << 36
    if nbytes > limit:
        _fail(f"argument {flag}: model_kwargs {json.dumps(dict(model_kwargs or {}))} build a {arch} with "
              f"{nbytes / 2**30:,.1f} GiB of weights, more than half of the {((free or 0) / 2**30):,.1f} GiB "
              "of free memory; check the width / depth options")


def _check_finite_weights(flag: str, model, path) -> None:
    """Refuse a model whose weights hold NaN or infinite values, naming the first such tensor:
    every output would be NaN, and the evaluation would report garbage numbers."""
    import torch

    for name, t in list(model.state_dict().items()):
        if not torch.is_tensor(t) or not t.is_floating_point() or t.numel() == 0:
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            nan = int(torch.isnan(t).sum())
            what = "all NaN" if nan == t.numel() else f"{bad} non-finite value(s) ({nan} NaN) of {t.numel()}"
            _fail(f"argument {flag}: {str(path)!r}: tensor {name!r} is {what}; the model cannot be evaluated")


def _load_apb_checkpoint(flag: str, path):
    """``load_checkpoint`` with its failures as one-line errors naming ``flag``."""
    from .bench.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path)
    except (CheckpointError, FileNotFoundError) as e:
        _fail(f"argument {flag}: {e}")


def _dedupe(values, flag: str, key=lambda v: v) -> list:
    """Values in order, each once; a repeated value is reported (it names the same cells)."""
    out, seen, dup = [], set(), []
    for v in values:
        k = key(v)
        if k in seen:
            dup.append(v)
            continue
        seen.add(k)
        out.append(v)
    if dup:
        print(f"apb run: note: {flag} repeats {sorted(set(dup))}; each cell runs once", file=sys.stderr)
    return out


def _check_arch(parser, name: str, flag: str) -> str:
    """The registry spelling of an architecture name, or a usage error naming ``flag``."""
    from .models import canonical_name, timm_available

    try:
        key = canonical_name(name)
    except (ValueError, TypeError) as e:
        parser.error(f"argument {flag}: {e}")
    if key.startswith("timm:") and not timm_available():
        parser.error(f"argument {flag}: {name!r} needs timm: pip install timm (or apb_sparse[timm])")
    return key


def _check_executor(parser, args) -> str:
    """The executor ``apb run`` uses; options of another executor are usage errors."""
    from .bench.executors import default_executor, ray_available, submitit_available

    executor = default_executor() if args.executor == "auto" else args.executor
    if executor == "ray" and not ray_available():
        parser.error("argument --executor: 'ray' needs Ray: pip install 'ray>=2.9' (or apb_sparse[ray])")
    if executor == "slurm" and not submitit_available():
        parser.error("argument --executor: 'slurm' needs submitit: pip install submitit (or apb_sparse[slurm])")
    ray_only = (("--ray-address", args.ray_address, None), ("--ray-timeout", args.ray_timeout, 60.0))
    slurm_only = (("--slurm-partition", args.slurm_partition, None), ("--slurm-time", args.slurm_time, 24 * 60),
                  ("--slurm-mem-gb", args.slurm_mem_gb, None), ("--slurm-account", args.slurm_account, None),
                  ("--slurm-qos", args.slurm_qos, None), ("--slurm-constraint", args.slurm_constraint, None),
                  ("--slurm-folder", args.slurm_folder, None), ("--slurm-local", args.slurm_local, False))
    if executor == "local":
        for flag, value, default in (("--workers", args.workers, None), ("--gpus-per-cell", args.gpus_per_cell, 0.0)):
            if value != default and not (flag == "--workers" and value == 1):
                parser.error(f"argument {flag}: needs --executor ray or slurm (the local executor runs one cell "
                             f"at a time in this process)")
    for flag, value, default in (ray_only if executor != "ray" else ()) + (slurm_only if executor != "slurm" else ()):
        if value != default:
            parser.error(f"argument {flag}: needs --executor {'ray' if flag.startswith('--ray') else 'slurm'} "
                         f"(the executor is {executor})")
    if executor == "slurm":
        for flag, value, low in (("--gpus-per-cell", args.gpus_per_cell, 0), ("--cpus-per-cell", args.cpus_per_cell, 1)):
            if value != int(value) or value < low:
                parser.error(f"argument {flag}: --executor slurm gives a job whole {flag[2:5].upper()}s; "
                             f"expected an integer >= {low}, got {value:g}")
    return executor


def _make_executor(executor: str, args, out: Path):
    """The executor instance of ``apb run`` (connected, for Ray); the caller shuts it down."""
    from .bench.executors import make_executor

    slurm = None
    folder = None
    if executor == "slurm":
        slurm = dict(partition=args.slurm_partition, time_min=args.slurm_time, mem_gb=args.slurm_mem_gb,
                     account=args.slurm_account, qos=args.slurm_qos, constraint=args.slurm_constraint,
                     cluster="local" if args.slurm_local else "slurm")
        folder = Path(args.slurm_folder) / "%j" if args.slurm_folder else out.resolve() / "slurm" / "%j"
    return make_executor(executor, workers=args.workers, address=args.ray_address, cpus_per_cell=args.cpus_per_cell,
                         gpus_per_cell=args.gpus_per_cell, max_retries=args.max_retries, ray_timeout=args.ray_timeout,
                         folder=folder, slurm=slurm)


def _download(datasets: Sequence[str], data_dir) -> None:
    """``--download``: fetch the torchvision datasets that are missing, before any work."""
    from .data import get_dataset

    for name in datasets:
        get_dataset(name, data_dir=data_dir, download=True)


def _cmd_run(args, parser) -> int:
    from .bench.presets import get_preset

    preset = get_preset(args.preset).with_overrides(base_epochs=args.base_epochs, aa_samples=args.aa_samples,
                                                    fmn_samples=args.fmn_samples, device=args.device,
                                                    threads=args.threads)
    methods = _check_methods(parser, args.methods, "--methods")
    structures = _dedupe(args.structures or list(preset.structures), "--structures")
    if args.structured_sparsities and not args.structures:
        structures = sorted(set(structures) | {"filter"}, key=STRUCTURE_CHOICES.index)
    sparsities = {k: list(v) for k, v in preset.sparsities.items()}
    as_cell = lambda v: round(float(v), 6)  # noqa: E731  (how results.py names a cell's sparsity)
    if args.sparsities:
        sparsities["unstructured"] = _dedupe(args.sparsities, "--sparsities", as_cell)
    if args.structured_sparsities:
        sparsities["filter"] = _dedupe(args.structured_sparsities, "--structured-sparsities", as_cell)
    seeds = _dedupe(args.seeds, "--seeds") if args.seeds else list(preset.seeds)
    datasets = _dedupe(args.datasets or list(preset.datasets), "--datasets")
    archs = _dedupe(args.archs or list(preset.archs), "--archs")
    from .data.datasets import _ALIASES
    _check_names(parser, datasets, "--datasets", set(_ALIASES))
    archs = [_check_arch(parser, a, "--archs") for a in archs]
    from . import methods as registry
    if not any(structure in registry.get(m).structures and sparsities.get(structure)
               for m in methods for structure in structures):
        parser.error(f"argument --structures: none of the methods {methods} supports {structures} "
                     f"with the given sparsities")
    executor = _check_executor(parser, args)
    out = Path(args.out or os.path.join("runs", preset.name))
    _check_out_folder("--out", out)

    from .bench.executors import interrupt_guard

    grid = dict(methods=methods, structures=structures, sparsities=sparsities, seeds=seeds, archs=archs,
                datasets=datasets)
    # Ctrl-C stops the driver even while it is blocked in native code (Ray's connection).
    with interrupt_guard():
        return _run_grid(args, preset, executor, out, grid)


def _run_grid(args, preset, executor: str, out: Path, grid: dict) -> int:
    from .bench.runner import run_benchmark
    from .data.datasets import DatasetNotFoundError

    t0 = time.perf_counter()
    ex = None
    try:
        if args.download:
            _download(grid["datasets"], args.data_dir)
        ex = _make_executor(executor, args, out)
        summary = run_benchmark(preset, out, **grid, data_dir=args.data_dir, device=preset.device,
                                progress=not args.quiet, latency=not args.no_latency, plots=not args.no_plots,
                                executor=ex, max_retries=args.max_retries)
    except DatasetNotFoundError as e:
        print(f"apb run: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"apb run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from .bench.results import read_records
        n = len({(r["method"], r["structure"], r["sparsity"], r["seed"], r["dataset"], r["arch"])
                 for r in read_records(out / "results.jsonl", warn=False)})
        print(f"\ninterrupted: the {n} finished cell(s) are kept in {out / 'results.jsonl'}; rerun the same "
              f"command (same --out {out}) to resume with the rest", file=sys.stderr)
        return 130
    finally:
        if ex is not None:
            ex.shutdown()
    _print_summary(summary, time.perf_counter() - t0)
    return 1 if summary.failed else 0


def _print_summary(summary, seconds: float) -> None:
    from .bench.leaderboard import leaderboard_rows
    from .bench.results import read_records

    from .bench.leaderboard import REFERENCES

    rows = leaderboard_rows(read_records(summary.out_dir / "results.jsonl", warn=False))
    # Reference rows (dense, dense_base) are repeated per structure in the leaderboard: once here.
    width = max([12] + [len(r["method"]) for r in rows])
    swidth = max([9] + [len(r["structure"]) for r in rows])
    print()
    print(f"{'method':<{width}} {'structure':<{swidth}} {'seed':>4} {'sparsity':>8} {'clean%':>7} {'AA%':>6} "
          f"{'d_med':>6} {'dense ms':>9} {'sparse ms':>9} {'speedup':>7} {'b1 speedup':>10}  flags")
    seen = set()
    for r in rows:
        ref = r["method"] in REFERENCES
        key = (r["dataset"], r["arch"], r["method"], r["sparsity"], r["seed"], "" if ref else r["structure"])
        if key in seen:
            continue
        seen.add(key)

        def f(v, fmt):
            return "-" if v is None else fmt.format(v)

        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}"
        print(f"{r['method']:<{width}} {'-' if ref else r['structure']:<{swidth}} {r['seed']:>4} "
              f"{100 * r['sparsity']:>7.1f}% {pct(r['clean_acc']):>7} "
              f"{pct(r['aa_acc']):>6} {f(r['median_min_norm'], '{:.3f}'):>6} {f(r['cpu_dense_ms'], '{:.2f}'):>9} "
              f"{f(r['cpu_sparse_ms'], '{:.2f}'):>9} {f(r['cpu_speedup'], '{:.2f}x'):>7} "
              f"{f(r['b1_speedup'], '{:.2f}x'):>10}  {r['flags']}")
    print()
    print(f"ran {len(summary.ran)} cells ({getattr(summary, 'executor', 'local')} executor), skipped "
          f"{len(summary.skipped)} already finished, {len(summary.failed)} failed; wall time {seconds:.1f} s")
    if getattr(summary, "timed", 0):
        print(f"latency: {summary.timed} deployed models timed in one exclusive interleaved phase "
              f"({summary.timing_seconds:.1f} s)")
    for key, err in summary.failed:
        print(f"  FAILED {key}: {err}")
    print(f"results:     {summary.out_dir / 'results.jsonl'}")
    for kind, path in summary.files.items():
        print(f"{kind + ':':<12} {path}")


def _cmd_prune(args, parser) -> int:
    import torch

    from . import methods as registry
    from . import sparsify, sparsity_report
    from .bench.checkpoint import is_apb_checkpoint, load_dense_model, save_checkpoint
    from .bench.presets import get_preset
    from .bench.runner import build_model, get_base_model, load_data, make_recipe, resolve_device

    name = _check_methods(parser, [args.method], "--method")[0]
    cls = registry.get(name)
    if args.structure not in cls.structures:
        parser.error(f"argument --structure: {name} supports {list(cls.structures)}, got {args.structure!r}")
    from .bench.checkpoint import CheckpointError, read_state_dict
    from .data.datasets import DatasetNotFoundError

    preset = get_preset(args.preset).with_overrides(device=args.device)
    dataset = args.dataset or preset.datasets[0]
    arch = _check_arch(parser, args.arch, "--arch") if args.arch else preset.archs[0]
    out = Path(args.out or f"pruned-{name}-{args.structure}-{args.sparsity:g}.safetensors")
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    _check_output("--out", out)
    base_state = None
    if args.base:  # read (and so check) the base before any training
        try:
            if not is_apb_checkpoint(args.base, strict=True):
                base_state = read_state_dict(args.base)
        except (CheckpointError, FileNotFoundError) as e:
            _fail(f"argument --base: {e}")
    dev = resolve_device(preset.device)
    try:
        if args.download:
            _download([dataset], args.data_dir)
        data = load_data(dataset, preset, args.data_dir)
    except DatasetNotFoundError as e:
        _fail(str(e))
    if args.base:
        if base_state is None:
            base, _ = _load_apb_checkpoint("--base", args.base)
        else:
            try:
                base = load_dense_model(args.base, arch, num_classes=int(data.num_classes),
                                        in_channels=int(data.input_shape[0]), model_kwargs=preset.model_kwargs,
                                        state=base_state)
            except CheckpointError as e:
                _fail(f"argument --base: {e}")
        from . import densify
        base = densify(base).to(dev)
    else:
        work = Path(args.work_dir or os.path.join("runs", preset.name))
        base, _ = get_base_model(preset, arch, dataset, data, args.seed, work, device=dev, progress=not args.quiet)
    recipe = make_recipe(preset, arch, dataset, args.seed, progress=not args.quiet)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        if cls.tags.pipeline == "A":
            res = cls().prune(base, data, sparsity=args.sparsity, structure=args.structure, recipe=recipe,
                              pretrained=True)
        else:
            res = cls().prune(build_model(preset, arch, data, args.seed).to(dev), data, sparsity=args.sparsity,
                              structure=args.structure, recipe=recipe, pretrained=False)
    sparse = sparsify(res.model.cpu()).eval()
    print(sparsity_report(sparse, (1, *data.input_shape)))
    save_checkpoint(sparse, out, arch=arch, num_classes=int(data.num_classes), in_channels=int(data.input_shape[0]),
                    model_kwargs=preset.model_kwargs,
                    extra={"method": name, "structure": args.structure, "sparsity": args.sparsity, "seed": args.seed,
                           "dataset": dataset, "measured_sparsity": res.log.get("sparsity")})
    print(f"\n{name} pruned to {100 * res.log['sparsity']:.2f} % of prunable weights in {time.perf_counter() - t0:.1f} s; "
          f"saved {out} (+ {out.with_suffix('.json').name})\nevaluate it with: apb eval --checkpoint {out}")
    return 0


def _cmd_eval(args, parser) -> int:
    import torch

    from . import sparsity_report
    from .bench.checkpoint import is_apb_checkpoint, load_checkpoint, load_dense_model, save_checkpoint
    from .bench.presets import get_preset
    from .bench.results import _finite
    from .bench.runner import evaluate_model, load_data, resolve_device
    from .data.datasets import DatasetNotFoundError

    from .bench.checkpoint import CheckpointError, read_state_dict

    path = Path(args.checkpoint)
    if not path.is_file():
        _fail(f"argument --checkpoint: no such file {str(path)!r}")
    if args.save_sparse:
        _check_output("--save-sparse", args.save_sparse, suffix=".safetensors")
    if args.out:
        _check_output("--out", args.out)
    preset = get_preset(args.preset).with_overrides(
        attack=args.attack, norm=args.norm, eps=args.eps, aa_samples=args.n_samples, fmn_samples=args.fmn_samples,
        check_samples=args.check_samples, fmn_steps=args.fmn_steps)
    dev = resolve_device(args.device)
    try:
        ours = is_apb_checkpoint(path, strict=True)
        if ours:
            from .bench.checkpoint import _parse_config, _read_metadata
            cfg0 = _parse_config(path, (_read_metadata(path) or {})["apb_sparse_config"])
            _check_model_size("--checkpoint", cfg0["arch"], cfg0["num_classes"], cfg0["in_channels"],
                              cfg0.get("model_kwargs"))
            sparse, config = load_checkpoint(path)
            arch = config["arch"]
            extra = config.get("extra")
            dataset = args.dataset or (extra.get("dataset") if isinstance(extra, dict) else None)
            if not isinstance(dataset, str):
                _fail(f"argument --dataset: required ({path} does not record its dataset)")
            if args.download:
                _download([dataset], args.data_dir)
            data = load_data(dataset, preset.with_overrides(), args.data_dir)
            model, kind = sparse, "apb_sparse checkpoint"
        else:
            state = read_state_dict(path)  # a broken file is reported as such, before asking for --arch
            if not args.arch or not args.dataset:
                parser.error(f"arguments --arch and --dataset are required for a plain state dict checkpoint "
                             f"({path} is not an apb_sparse checkpoint)")
            from .models import adapt_state_dict
            arch, dataset = _check_arch(parser, args.arch, "--arch"), args.dataset
            # RobustBench's and bare timm state dicts differ from our layouts in names only.
            state, notes = adapt_state_dict(arch, state)
            normalize = args.normalize or ("none" if arch.startswith("robustbench:") else "dataset")
            if args.download:
                _download([dataset], args.data_dir)
            data = load_data(args.dataset, preset, args.data_dir)
            c = int(data.input_shape[0])
            norm_stats = (list(data.mean), list(data.std)) if normalize == "dataset" else ([0.0] * c, [1.0] * c)
            _check_model_size("--model-kwargs", arch, int(data.num_classes), c, args.model_kwargs)
            model = load_dense_model(path, arch, num_classes=int(data.num_classes), in_channels=c,
                                     model_kwargs=args.model_kwargs, normalization=norm_stats, state=state)
            sparse, kind = None, "dense state dict"
            if model.apb_normalization == "supplied":
                kind += (f", no normalisation buffers: inputs normalised with the {dataset} statistics"
                         if normalize == "dataset" else ", no normalisation buffers: inputs not normalised")
            if notes:
                kind += "; " + "; ".join(notes)
    except (CheckpointError, DatasetNotFoundError, FileNotFoundError) as e:
        _fail(f"argument --checkpoint: {e}" if isinstance(e, CheckpointError) else str(e))
    except (ValueError, TypeError) as e:  # an --arch / --model-kwargs / --dataset refused by name
        _fail(str(e))
    _check_finite_weights("--checkpoint", model, path)
    input_shape = tuple(int(s) for s in data.input_shape)
    report = sparsity_report(model, (1, *input_shape))
    print(f"{path} ({kind}): {arch} on {dataset}; detected sparsity {100 * report.sparsity:.2f} % "
          f"({report.nonzeros:,} nonzeros of {report.numel:,} conv/linear weights)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        result, sparse = evaluate_model(model, data, preset, seed=args.seed, device=dev, input_shape=input_shape,
                                        latency=not args.no_latency, sparse_model=sparse,
                                        progress=True)
    print(sparsity_report(sparse, (1, *input_shape)))
    aa, mn = result["autoattack"], result["min_norm"]
    print(f"\nclean {100 * result['clean_accuracy']:.2f} %   {aa['attack']} {preset.norm} eps={preset.eps:.4g}: "
          f"robust {100 * result['robust_accuracy']:.2f} % on {aa['n_samples']} images")
    err = mn.get("clean_error_share")
    print(f"FMN median min-norm distance {mn['median_distance']:.4f} over the correctly classified of "
          f"{mn['n_samples']} images" + (f" ({100 * err:.1f} % clean errors)" if err is not None else "")
          + "; masking checks: "
          + ", ".join(f"{c['name']}={'ok' if c['passed'] else 'FAILED'}" for c in mn["checks"]))
    lat = (result.get("latency") or {})
    for dev_name, l in lat.items():
        if "error" in l:
            print(f"{dev_name} latency: {l['error']}")
        else:
            print(f"{dev_name} latency (batch {l['batch']}, both deployed with apb_sparse.deploy): dense "
                  f"{l['dense_ms']:.3f} ms, sparse {l['sparse_ms']:.3f} ms, speedup {l['speedup']:.2f}x "
                  f"(vs eager dense torch {l['dense_eager_ms']:.3f} ms: {l['speedup_vs_eager']:.2f}x)")
            print(f"  speedup baseline (the leaderboard's): {l.get('baseline', '?')}")
    sz = result["size_bytes"]
    print(f"state dict size: dense {sz['dense']:,} B, sparse {sz['sparse']:,} B")
    if result["flags"]:
        print(f"flags: {' '.join(result['flags'])}")
    if args.save_sparse:
        save_checkpoint(sparse, args.save_sparse, arch=arch, num_classes=int(data.num_classes),
                        in_channels=int(data.input_shape[0]), model_kwargs=args.model_kwargs or {},
                        extra={"dataset": dataset, "source": str(path)})
        print(f"saved the sparse model to {args.save_sparse}")
    if args.out:
        from .bench import environment
        from .bench.results import atomic_write_text
        doc = {"checkpoint": str(path), "kind": kind, "arch": arch, "dataset": dataset,
               "preset": preset.to_dict(), "environment": environment(), **result}
        atomic_write_text(args.out, json.dumps(_finite(doc), indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


def _cmd_bench_latency(args, parser) -> int:
    import torch

    from . import apply_masks, magnitude_masks, sparsify, sparsity_report
    from .bench import environment
    from .bench.runner import measure_latency

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: 'cuda' requested but no GPU is available")
    torch.set_flush_denormal(True)
    dev = torch.device(args.device)
    if args.out:
        _check_output("--out", args.out)
    rows = []
    if args.checkpoint:
        from . import densify
        sparse, cfg = _load_apb_checkpoint("--checkpoint", args.checkpoint)
        _check_finite_weights("--checkpoint", sparse, args.checkpoint)  # else "differs from dense by nan"
        shape = args.input_shape or ((1, 8, 8) if cfg["arch"] == "small_cnn" else (cfg["in_channels"], 32, 32))
        variants = [(f"checkpoint {Path(args.checkpoint).name}", densify(sparse), sparse)]
    else:
        from .models import get_model
        kw = args.model_kwargs or {}
        shape = tuple(args.input_shape or ((1, 8, 8) if args.arch == "small_cnn" else (3, 32, 32)))
        try:
            torch.manual_seed(0)
            dense = get_model(args.arch, num_classes=args.num_classes, in_channels=shape[0], **kw).eval()
        except (ValueError, TypeError) as e:
            parser.error(f"argument --arch/--model-kwargs: {e}")
        variants = []
        for s in args.sparsities:
            masked = apply_masks(dense, magnitude_masks(dense, s, structure="channels" if args.structure == "filter"
                                                        else "unstructured"))
            variants.append((f"{args.structure} {100 * s:g} %", masked, sparsify(masked)))
    print(f"{'model':<28} {'batch':>5} {'sparsity':>8} {'dense ms':>10} {'sparse ms':>10} {'speedup':>8}")
    for label, dense_m, sparse_m in variants:
        rep = sparsity_report(sparse_m)
        for b in args.batch:
            lat = measure_latency(dense_m, sparse_m, shape, batch=b, rounds=args.rounds, device=dev)
            if not lat["outputs_match"]:
                print(f"{label}: sparse output differs from dense by {lat['max_abs_diff']:.3g}", file=sys.stderr)
                return 1
            rows.append({"model": label, "sparsity": rep.sparsity, **lat})
            print(f"{label:<28} {b:>5} {100 * rep.sparsity:>7.2f}% {lat['dense_ms']:>10.3f} {lat['sparse_ms']:>10.3f} "
                  f"{lat['speedup']:>7.2f}x", flush=True)
    if args.out:
        from .bench.results import atomic_write_text
        atomic_write_text(args.out, json.dumps({"environment": environment(), "arch": args.arch,
                                                "input_shape": list(shape), "results": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


def _cmd_leaderboard(args, parser) -> int:
    from .bench.leaderboard import to_markdown, write_leaderboard
    from .bench.results import read_records

    path = Path(args.results) if args.results else Path(args.out) / "results.jsonl"
    if not path.is_file():
        parser.error(f"argument {'--results' if args.results else '--out'}: no results file {str(path)!r}")
    _check_output("--results" if args.results else "--out", path.parent / "leaderboard.md")
    records = read_records(path)
    files = write_leaderboard(records, path.parent, plots=not args.no_plots)
    print(to_markdown(records))
    for kind, f in files.items():
        print(f"{kind + ':':<10} {f}")
    return 0


def _cmd_taxonomy(args, parser) -> int:
    from . import methods as registry
    from . import taxonomy

    entries = taxonomy.implemented() if args.implemented else None
    if args.json:
        print(json.dumps(taxonomy.as_dicts(entries), indent=1, default=str))
        return 0
    if args.markdown:
        print(taxonomy.to_markdown(entries))
    else:
        taxonomy.print_table(entries)
    surveyed = {m.implemented for m in taxonomy.METHODS if m.implemented}
    extra = [n for n in registry.available() if n not in surveyed]
    if extra:
        print(f"\nbaselines in the registry (not surveyed methods): {', '.join(extra)}")
    print(f"registry names for `apb run --methods`: {', '.join(registry.available())}")
    return 0


# Import names of the "bench" extra's packages (pyproject.toml).
_BENCH_MODULES = {"torchvision", "sklearn", "scipy", "tqdm", "safetensors", "matplotlib", "pyautoattack", "secml",
                  "secmlt"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``apb`` console script.

    Argument errors exit with code 2 (argparse's usage message).  Any other failure is reported
    as one ``apb: error: ...`` line on stderr, without a traceback: exit code 2 for bad input
    (unreadable or corrupted files, paths that cannot be written), 1 for anything else.  Set
    ``APB_DEBUG=1`` in the environment to get the traceback of the latter instead.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        from .bench.checkpoint import CheckpointError
    except ModuleNotFoundError as e:
        return _missing_module(e)
    try:
        return _dispatch(parser, args)
    except _CliError as e:
        return _report(str(e), e.code)
    except (CheckpointError, OSError) as e:  # a file we were given or told to write
        return _report(str(e), 2)
    except KeyboardInterrupt:
        print("\napb: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        return _missing_module(e)
    except Exception as e:
        if os.environ.get("APB_DEBUG"):
            raise
        return _report(f"{type(e).__name__}: {e} (set APB_DEBUG=1 for the traceback)", 1)


def _missing_module(e: ModuleNotFoundError) -> int:
    if e.name and e.name.split(".")[0] in _BENCH_MODULES:  # the core install has torch + numpy only
        return _report(f"the apb command needs the 'bench' extra (module {e.name!r} is missing): "
                       "pip install 'apb_sparse[bench]'", 1)
    if os.environ.get("APB_DEBUG"):
        raise e
    return _report(f"{type(e).__name__}: {e} (set APB_DEBUG=1 for the traceback)", 1)


def _report(message: str, code: int) -> int:
    print(f"apb: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _dispatch(parser: argparse.ArgumentParser, args) -> int:
    sub = {a.dest: a for a in parser._actions if isinstance(a, argparse._SubParsersAction)}["command"]
    sp = sub.choices[args.command]
    if args.command == "run":
        return _cmd_run(args, sp)
    if args.command == "prune":
        return _cmd_prune(args, sp)
    if args.command == "eval":
        return _cmd_eval(args, sp)
    if args.command == "bench":
        if args.bench_command != "latency":
            sp.print_help()
            return 2
        bsub = {a.dest: a for a in sp._actions if isinstance(a, argparse._SubParsersAction)}["bench_command"]
        return _cmd_bench_latency(args, bsub.choices["latency"])
    if args.command == "leaderboard":
        return _cmd_leaderboard(args, sp)
    if args.command == "taxonomy":
        return _cmd_taxonomy(args, sp)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
