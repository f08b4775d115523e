"""The benchmark behind ``apb run``: every method at every sparsity and seed, robustness and
measured speed of each pruned model, next to a dense reference trained with the same budget;
resumable, on one process or on a Ray cluster.

A *cell* is (method, arch, dataset, structure, sparsity, seed). For each cell not yet in
``OUT/results.jsonl``, an executor (``local``: this process; ``ray``: a Ray task on any worker,
see :mod:`apb_sparse.bench.executors`) runs :func:`run_cell`:

* the method prunes: pipeline A starts from the dense base model of (dataset, arch, seed), trained
  once before the cells that need it and shared through ``OUT/base/``; pipelines B/D start from
  the same initialisation with the same total epoch budget. The "dense" cell is the dense
  reference: adversarially trained from that initialisation for the same total budget;
* :func:`evaluate_model`: sparsity actually reached (``sparsity_report``) and the per-layer sparse
  paths; clean and robust accuracy (AutoAttack standard, or the preset's cheaper custom subset);
  minimum-norm FMN distances -> median distance and security curve, with the gradient-masking
  checks of ``apb_sparse.robustness.evaluate``; agreement of ``apb_sparse.sparsify``'s model with
  the dense-with-zeros model; state-dict sizes;
* the sparse checkpoint (nonzeros only) goes to ``OUT/checkpoints/``, the cell's log to
  ``OUT/logs/``, and the record back to the driver, which alone appends it to the JSONL file.

Latency is measured afterwards, by the driver, in one exclusive phase when no cell runs
(:func:`time_deployed`): all deployed models of the run interleaved with one dense baseline per
(dataset, arch). Then the leaderboard (Markdown, CSV, HTML) and plots are written.

Attacks run on the dense-with-zeros model (``densify``): it computes the same function as the
sparse one (checked on the attacked images) and uses the vendor kernels for the many backward
passes the attacks need.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import socket
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .checkpoint import load_checkpoint, save_checkpoint, state_dict_bytes
from .presets import Preset
from .results import ResultsStore, atomic_write_text, cell_id, cell_key

__all__ = ["DENSE", "DENSE_BASE", "REFERENCES", "resolve_device", "load_data", "build_model", "make_recipe", "get_base_model",
           "quick_autoattack", "robustness", "measure_latency", "evaluate_model", "Cell",
           "plan_cells", "run_benchmark", "RunSummary", "run_cell", "train_base", "time_deployed",
           "lr_sum", "training_budget"]

DENSE = "dense"
#: The dense base model of pipeline-A methods (the model they prune), evaluated as its own row: it
#: has the budget of the base phase only, so it sits below the equal-budget "dense" reference.
DENSE_BASE = "dense_base"
REFERENCES = (DENSE, DENSE_BASE)


# ----------------------------------------------------------------------------------- setup
def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cuda" without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device(name)


def load_data(dataset: str, preset: Preset, data_dir: Optional[str] = None):
    from ..data import get_dataset

    return get_dataset(dataset, data_dir=data_dir, train_subset=preset.train_subset)


def build_model(preset: Preset, arch: str, data, seed: int) -> nn.Module:
    """A freshly initialised ``arch`` under ``seed``, sized for ``data``, with its statistics."""
    from ..models import get_model

    kw = dict(preset.model_kwargs)
    if getattr(data, "mean", ()):
        kw.update(mean=data.mean, std=data.std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_model(arch, num_classes=int(data.num_classes), in_channels=int(data.input_shape[0]), **kw)


def make_recipe(preset: Preset, arch: str, dataset: str, seed: int, *, progress: bool = False):
    """The recipe every method shares (``pretrain_epochs`` = the base model's epochs)."""
    from ..methods import Recipe

    kw = dict(preset.recipe)
    return Recipe(arch=arch, dataset=dataset, norm=preset.norm, eps=preset.eps,
                  pretrain_epochs=preset.base_epochs, prune_epochs=preset.prune_epochs,
                  finetune_epochs=preset.finetune_epochs, seed=seed, progress=progress, **kw)


def _base_path(out_dir: Path, preset: Preset, arch: str, dataset: str, seed: int) -> Path:
    return out_dir / "base" / f"{dataset}-{arch}-seed{seed}-{preset.identity_hash()}.safetensors"


def get_base_model(preset: Preset, arch: str, dataset: str, data, seed: int, out_dir: Path, *,
                   device: torch.device, progress: bool = True, log: Callable[[str], None] = print
                   ) -> Tuple[nn.Module, Dict[str, Any]]:
    """The dense adversarially trained base model: loaded from ``OUT/base/`` or trained and cached."""
    from ..train import train

    path = _base_path(out_dir, preset, arch, dataset, seed)
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        model, _ = load_checkpoint(path)
        info = json.loads(info_path.read_text())
        log(f"[base] loaded {path} (trained in {info.get('train_seconds', float('nan')):.1f} s)")
        return model.to(device), info
    recipe = make_recipe(preset, arch, dataset, seed, progress=progress)
    model = build_model(preset, arch, data, seed).to(device)
    log(f"[base] adversarially training dense {arch} on {dataset}: {preset.base_epochs} epochs "
        f"{recipe.mode.upper()} {preset.norm} eps={preset.eps:.4g} steps={recipe.steps} on {device}")
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tlog = train(model, data, recipe.train_config(preset.base_epochs, lr=recipe.lr), progress=progress)
    seconds = time.perf_counter() - t0
    model.eval()
    info = {"arch": arch, "dataset": dataset, "seed": seed, "epochs": preset.base_epochs,
            "train_seconds": seconds, "train_log": tlog.to_dict(), "preset_identity": preset.identity()}
    save_checkpoint(model, path, arch=arch, num_classes=int(data.num_classes),
                    in_channels=int(data.input_shape[0]), model_kwargs=preset.model_kwargs,
                    extra={"role": "dense base model"})
    atomic_write_text(info_path, json.dumps(info, indent=1, default=str))
    log(f"[base] trained in {seconds:.1f} s, cached in {path}")
    return model, info


# ----------------------------------------------------------------------------------- attacks
@contextlib.contextmanager
def _eval_frozen(model: nn.Module):
    was = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        model.train(was)
        for p, f in flags:
            p.requires_grad_(f)


@contextlib.contextmanager
def _quiet_autoattack():
    logger = logging.getLogger("auto-attack")
    old = logger.propagate
    logger.propagate = False
    try:
        yield
    finally:
        logger.propagate = old


def _lp(t: Tensor, norm: str) -> Tensor:
    flat = t.flatten(1)
    return flat.abs().amax(1) if norm == "Linf" else flat.norm(dim=1)


def _predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])


def quick_autoattack(model: nn.Module, x: Tensor, y: Tensor, *, norm: str, eps: float, n_iter: int,
                     n_targets: int, seed: int = 0, batch_size: int = 256) -> Dict[str, Any]:
    """A cheaper custom AutoAttack: APGD-CE (1 restart) then APGD-T on the points still robust.

    Uses the original authors' attacks (``pyautoattack``) with fewer iterations and target
    classes than version "standard". Every adversarial example is re-verified here: inside the
    ball, in [0, 1], and misclassified by ``model``.

    Returns:
        ``{"attack", "clean_accuracy", "robust_accuracy", "per_attack", "robust" (per-sample
        bools as a list), "n_samples", "seconds"}``.
    """
    from pyautoattack import AutoAttack

    t0 = time.perf_counter()
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    n = x.shape[0]
    n_targets = max(1, min(int(n_targets), int(model(x[:1]).shape[1]) - 1)) if n else 1
    with _eval_frozen(model), _quiet_autoattack():
        correct = _predict(model, x, batch_size) == y
        robust = correct.clone()
        per_attack = {"clean": float(correct.float().mean())}
        for attack in ("apgd-ce", "apgd-t"):
            idx = robust.nonzero().flatten()
            if idx.numel() > 0:
                aa = AutoAttack(model, attacks=[attack], version="custom", eps=eps, norm=norm, seed=seed,
                                device=device)
                aa.verbose = False
                aa.apgd.n_restarts = 1
                aa.apgd.n_iter = n_iter
                aa.apgd_targeted.n_restarts = 1
                aa.apgd_targeted.n_iter = n_iter
                aa.apgd_targeted.n_target_classes = n_targets
                x_adv, _ = aa.run_standard_evaluation(x[idx], y[idx], batch_size=batch_size)
                x_adv = x_adv.to(device)
                inside = (_lp(x_adv - x[idx], norm) <= eps * (1 + 1e-4) + 1e-6) & \
                         (x_adv.amin(dim=tuple(range(1, x.dim()))) >= -1e-6) & \
                         (x_adv.amax(dim=tuple(range(1, x.dim()))) <= 1 + 1e-6)
                fooled = (_predict(model, x_adv, batch_size) != y[idx]) & inside
                robust[idx[fooled]] = False
            per_attack[attack] = float(robust.float().mean())
    label = f"custom:apgd-ce(1x{n_iter}),apgd-t({n_targets}x{n_iter})"
    return {"attack": label, "clean_accuracy": per_attack["clean"], "robust_accuracy": float(robust.float().mean()),
            "per_attack": per_attack, "robust": robust.cpu().tolist(), "n_samples": n,
            "seconds": time.perf_counter() - t0}


def robustness(model: nn.Module, data, preset: Preset, *, seed: int = 0,
               on_autoattack_done: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """AutoAttack (standard or the quick subset) and FMN min-norm with masking checks
    (``on_autoattack_done`` is called between the two, for progress reports).

    Returns:
        ``{"clean_accuracy", "robust_accuracy", "autoattack": {...}, "min_norm": {...},
        "flags": [...]}``.
    """
    from ..robustness import evaluate

    if preset.attack == "standard":
        r = evaluate(model, data, attack="autoattack", version="standard", norm=preset.norm, eps=preset.eps,
                     n_samples=preset.aa_samples, batch_size=preset.eval_batch, seed=seed, checks=False)
        aa = {"attack": r.attack, "clean_accuracy": r.clean_accuracy, "robust_accuracy": r.robust_accuracy,
              "per_attack": r.per_attack, "robust": r.robust.tolist(), "n_samples": r.n_samples,
              "seconds": r.attack_time, "version": "standard"}
    elif preset.attack == "quick":
        if hasattr(data, "tensors"):
            x, y = data.tensors("test", preset.aa_samples)
        else:
            x, y = data[0][:preset.aa_samples], data[1][:preset.aa_samples]
        aa = quick_autoattack(model, x, y, norm=preset.norm, eps=preset.eps, n_iter=preset.aa_iters,
                              n_targets=preset.aa_targets, seed=seed, batch_size=preset.eval_batch)
    else:
        raise ValueError(f"preset.attack must be 'quick' or 'standard', got {preset.attack!r}")
    if on_autoattack_done is not None:
        on_autoattack_done()

    grid = [preset.curve_max * i / 49 for i in range(50)]
    fmn = evaluate(model, data, attack="fmn", norm=preset.norm, eps=preset.eps, n_samples=preset.fmn_samples,
                   batch_size=preset.eval_batch, seed=seed, fmn_steps=preset.fmn_steps, eps_grid=grid,
                   checks=True, check_samples=preset.check_samples, square_queries=preset.square_queries)
    d = fmn.distances
    finite = d[torch.isfinite(d)]
    median = float(d.median()) if d.numel() else float("nan")
    # Clean errors have distance 0: over all images the median is 0 as soon as half of them are
    # misclassified, whatever the robustness of the rest. The leaderboard's median is over the
    # correctly classified images, with the share of clean errors beside it.
    correct = fmn.correct.to(d.device).bool()
    d_ok = d[correct]
    median_ok = float(d_ok.median()) if d_ok.numel() else float("nan")
    mn = {"attack": "fmn", "n_samples": fmn.n_samples, "steps": preset.fmn_steps,
          "median_distance": median_ok, "median_distance_all": median,
          "clean_error_share": float((~correct).float().mean()) if d.numel() else float("nan"),
          "robust_at_eps": fmn.robust_accuracy,
          "distances": [float(v) for v in d.tolist()],
          "security_curve": {"eps": fmn.security_curve[0], "robust_accuracy": fmn.security_curve[1]},
          "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in fmn.checks],
          "masking_suspected": fmn.masking_suspected, "seconds": fmn.wall_time,
          "found": int(finite.numel())}

    flags = []
    if fmn.masking_suspected:
        flags.append("masking?:" + ",".join(c.name for c in fmn.checks if not c.passed))
    # Cross-check of the two attacks on the images both saw: a min-norm attack finding more
    # adversarial points inside eps than AutoAttack means the AutoAttack number is too optimistic.
    m = min(len(aa["robust"]), fmn.n_samples)
    if m:
        aa_m = sum(aa["robust"][:m]) / m
        fmn_m = float(fmn.robust[:m].float().mean())
        mn["aa_robust_on_same_samples"] = aa_m
        if fmn_m < aa_m - (0.02 + 1.0 / m):
            flags.append("fmn<aa")
    return {"clean_accuracy": aa["clean_accuracy"], "robust_accuracy": aa["robust_accuracy"],
            "autoattack": {k: v for k, v in aa.items() if k != "robust"}, "min_norm": mn, "flags": flags}


# ----------------------------------------------------------------------------------- speed
LATENCY_BASELINE = ("the dense model deployed the same way (apb_sparse.deploy(dense, x, path='dense'): BatchNorm "
                    "folded, TorchScript graph); speedup_vs_eager is against the eager dense model")


def measure_latency(dense: nn.Module, sparse: nn.Module, input_shape: Sequence[int], *, batch: int,
                    rounds: int, device: torch.device) -> Dict[str, Any]:
    """Median inference latency of the deployed dense and sparse models, interleaved, same run.

    Both are timed as :func:`apb_sparse.deploy` snapshots (the form the leaderboard times): the
    baseline is ``deploy(dense, x, path="dense")``; ``speedup_vs_eager`` is against the eager dense
    model.  Outputs are compared first (a fast wrong model is not a result).
    """
    from .. import DeployedModel, deploy
    from . import interleaved_medians

    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch, *input_shape), generator=gen).to(device)
    eager = copy.deepcopy(dense).to(device).eval()
    dense_d = deploy(eager, x, path="dense")
    sparse_d = sparse if isinstance(sparse, DeployedModel) else deploy(copy.deepcopy(sparse).to(device).eval(), x)
    with torch.inference_mode():
        ref = eager(x)
        diff = float((sparse_d(x) - ref).abs().max())
        scale = max(1.0, float(ref.abs().max()))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        t = interleaved_medians({"eager": lambda: eager(x), "dense": lambda: dense_d(x), "sparse": lambda: sparse_d(x)},
                                rounds=rounds, warmup=2, min_time=0.02, sync=sync)
    e, d, s = t["eager"]["median_s"], t["dense"]["median_s"], t["sparse"]["median_s"]
    return {"device": str(device), "batch": batch, "rounds": rounds, "dense_ms": d * 1e3, "sparse_ms": s * 1e3,
            "dense_eager_ms": e * 1e3, "speedup": d / s, "speedup_vs_eager": e / s,
            "baseline": LATENCY_BASELINE,
            "dense_times_ms": [v * 1e3 for v in t["dense"]["times_s"]],
            "sparse_times_ms": [v * 1e3 for v in t["sparse"]["times_s"]], "max_abs_diff": diff,
            "outputs_match": diff <= 1e-3 * scale}


def evaluate_model(model: nn.Module, data, preset: Preset, *, seed: int = 0, device: torch.device,
                   input_shape: Sequence[int], latency: bool = True, robust: bool = True,
                   sparse_model: Optional[nn.Module] = None, progress: bool = False) -> Tuple[Dict[str, Any], nn.Module]:
    """Everything measured on one model (dense, masked or dense-with-zeros).

    Args:
        progress: show a progress bar over the phases (conversion, AutoAttack, FMN and the
            masking checks, latency) on stderr.

    Returns:
        ``(record_part, sparse_model)``: the measured sparsity, robustness, sparse/dense agreement,
        latency and sizes, and the ``apb_sparse.sparsify`` deployment model.
    """
    from tqdm.auto import tqdm

    phases = ["sparsify and check"] + (["AutoAttack", "FMN min-norm + masking checks"] if robust else []) \
        + (["latency"] if latency else [])
    bar = tqdm(total=len(phases), disable=not progress, unit="phase", dynamic_ncols=True,
               bar_format="{desc} [{n_fmt}/{total_fmt} phases, {elapsed}]")
    bar.set_description(phases[0])
    try:
        return _evaluate_model(model, data, preset, seed=seed, device=device, input_shape=input_shape,
                               latency=latency, robust=robust, sparse_model=sparse_model, bar=bar, phases=phases)
    finally:
        bar.close()


def _evaluate_model(model, data, preset, *, seed, device, input_shape, latency, robust, sparse_model, bar, phases):
    from .. import densify, sparsify, sparsity_report

    def step():
        bar.update(1)
        if bar.n < len(phases):
            bar.set_description(phases[bar.n])

    dense = densify(model).to(device).eval()
    n_check = max(preset.aa_samples, 1)
    if hasattr(data, "tensors"):
        xc, _ = data.tensors("test", n_check)
    else:
        xc = data[0][:n_check]
    bs = preset.latency_batch  # the deployment batch size, as timed below
    if sparse_model is None:
        sparse_model = sparsify(dense.cpu()).eval()
        dense = dense.to(device)
    sparse_model = sparse_model.eval()
    report = sparsity_report(sparse_model, (1, *input_shape))
    paths = {name: c.path for name, c in getattr(sparse_model, "apb_sparse_choices", {}).items()}
    out: Dict[str, Any] = {
        "measured_sparsity": report.sparsity, "nonzeros": report.nonzeros, "numel": report.numel,
        "dense_macs": report.dense_macs, "sparse_macs": report.sparse_macs,
        "layers": [{"name": l.name, "path": l.path, "shape": l.shape, "sparsity": l.sparsity} for l in report.layers],
        "paths": paths,
        "size_bytes": {"dense": state_dict_bytes(dense.state_dict()),
                       "sparse": state_dict_bytes(sparse_model.state_dict())},
        "flags": [],
    }
    # The sparse model must compute what the dense one does, on the very images attacked.
    with torch.inference_mode():
        dc = dense.cpu() if device.type != "cpu" else dense
        ref = torch.cat([dc(xc[i:i + bs]) for i in range(0, xc.shape[0], bs)])
        got = torch.cat([sparse_model(xc[i:i + bs]) for i in range(0, xc.shape[0], bs)])
    dense = dense.to(device)
    agreement = float((ref.argmax(1) == got.argmax(1)).float().mean())
    out["sparse_check"] = {"n_samples": int(xc.shape[0]), "prediction_agreement": agreement,
                           "max_abs_diff": float((ref - got).abs().max())}
    if agreement < 0.99:
        out["flags"].append("sparse!=dense")
    step()

    if robust:
        rob = robustness(dense, data, preset, seed=seed, on_autoattack_done=step)
        out["flags"] += rob.pop("flags")
        out.update(rob)
        step()
    if latency:
        lat = {"cpu": measure_latency(dense, sparse_model, input_shape, batch=preset.latency_batch,
                                      rounds=preset.latency_rounds, device=torch.device("cpu"))}
        if torch.cuda.is_available():
            try:
                lat["cuda"] = measure_latency(dense, sparse_model, input_shape, batch=preset.latency_batch,
                                              rounds=preset.latency_rounds, device=torch.device("cuda"))
            except Exception as e:  # e.g. an extension built without CUDA kernels: say so, go on
                lat["cuda"] = {"error": f"{type(e).__name__}: {e}"}
        out["latency"] = lat
        if not lat["cpu"]["outputs_match"]:
            out["flags"].append("latency-output-mismatch")
        step()
    return out, sparse_model


# ----------------------------------------------------------------------------------- budgets
def lr_sum(lr: float, steps: int, scheduler: Optional[str], schedule_steps: Optional[int] = None) -> float:
    """Sum of the learning rates of the first ``steps`` optimiser steps of train.py's
    ``scheduler`` (cosine, step decay, or constant) planned over ``schedule_steps`` (default:
    ``steps``; more when a phase stopped early), computed with the same torch scheduler."""
    from types import SimpleNamespace

    from ..train import _make_scheduler

    steps = int(steps or 0)
    if steps <= 0:
        return 0.0
    planned = max(steps, int(schedule_steps or steps))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=float(lr))
    sched = _make_scheduler(opt, SimpleNamespace(epochs=planned, scheduler=scheduler or "none"), 1)
    total = 0.0
    for _ in range(steps):
        total += opt.param_groups[0]["lr"]
        opt.step()  # no gradient: a no-op that keeps the scheduler's call order check quiet
        if sched is not None:
            sched.step()
    return total


def training_budget(phases: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The optimisation budget of one model: per phase (epochs, SGD steps, peak lr, sum of lr)
    and the totals. Phases that did not train (0 epochs, "pretrained") count zero."""
    out = []
    for p in phases:
        steps = int(p.get("steps") or 0)
        lr = p.get("lr")
        out.append({"phase": p.get("phase"), "epochs": int(p.get("epochs") or 0), "steps": steps,
                    "lr": lr, "lr_sum": lr_sum(lr, steps, p.get("scheduler"), p.get("schedule_steps"))
                    if lr is not None else 0.0})
    return {"phases": out, "epochs": sum(p["epochs"] for p in out), "steps": sum(p["steps"] for p in out),
            "lr_sum": sum(p["lr_sum"] for p in out)}


# ----------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Cell:
    method: str
    arch: str
    dataset: str
    structure: str
    sparsity: float
    seed: int

    @property
    def key(self) -> Tuple:
        return cell_key(self.__dict__)

    @property
    def id(self) -> str:
        return cell_id(self.key)


def _unique(values: Sequence) -> List:
    out: List = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def plan_cells(preset: Preset, *, methods: Sequence[str], structures: Sequence[str],
               sparsities: Dict[str, Sequence[float]], seeds: Sequence[int], archs: Sequence[str],
               datasets: Sequence[str]) -> List[Cell]:
    """Every cell of the grid, dense rows first, sparsity-major (an interrupted run still has
    every method at the lower sparsities). Methods that do not support a structure are left out.
    Repeated values (``--sparsities 0.5 0.5``, ``--seeds 0 0``) name one cell: the grid is
    deduplicated, keeping the first occurrence's order."""
    from .. import methods as registry

    cells: List[Cell] = []
    seen = set()

    def add(cell: Cell) -> None:
        if cell.key not in seen:
            seen.add(cell.key)
            cells.append(cell)

    for dataset in _unique(datasets):
        for arch in _unique(archs):
            for seed in _unique([int(s) for s in seeds]):
                add(Cell(DENSE, arch, dataset, "none", 0.0, seed))
                if any(registry.get(m).tags.pipeline == "A" for m in methods):
                    add(Cell(DENSE_BASE, arch, dataset, "none", 0.0, seed))
                for structure in _unique(structures):
                    for s in sparsities.get(structure, ()):
                        for m in methods:
                            if structure in registry.get(m).structures:
                                add(Cell(m.lower(), arch, dataset, structure, float(s), seed))
    return cells


@dataclass
class RunSummary:
    out_dir: Path
    ran: List[Tuple] = field(default_factory=list)
    skipped: List[Tuple] = field(default_factory=list)
    failed: List[Tuple[Tuple, str]] = field(default_factory=list)
    seconds: float = 0.0
    files: Dict[str, str] = field(default_factory=dict)
    executor: str = "local"
    timed: int = 0
    timing_seconds: float = 0.0


def _method_tags(name: str) -> Optional[Dict[str, Any]]:
    if name in REFERENCES:
        return None
    from .. import methods as registry

    cls = registry.get(name)
    # The method's one-line differences from its authors' code go with its tags (leaderboard notes).
    return dict(cls.tags.as_dict(), notes=getattr(cls, "notes", "") or "", caveat=getattr(cls, "caveat", "") or "")


def _check_run_config(out_dir: Path, preset: Preset) -> None:
    """Refuse to mix results of different configurations in one output folder."""
    path = out_dir / "run.json"
    identity = preset.identity()
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("identity_hash") != preset.identity_hash():
            diff = sorted(k for k in set(old.get("identity", {})) | set(identity)
                          if json.dumps(old.get("identity", {}).get(k), default=str, sort_keys=True)
                          != json.dumps(identity.get(k), default=str, sort_keys=True))
            raise ValueError(f"--out {out_dir} holds results of another configuration (differs in {diff}); "
                             "use another --out folder (or delete this one) to start over")
    else:
        atomic_write_text(path, json.dumps({"preset": preset.name, "identity_hash": preset.identity_hash(),
                                            "identity": identity}, indent=1, default=str))


# ----------------------------------------------------------------------------------- tasks
# The two task functions below are what an executor runs (in this process, or in a Ray worker on
# any node). They take only picklable arguments, read their inputs from the run folder (which on a
# cluster must be shared storage) and return JSON-able results; they never write results.jsonl.

_DATA_CACHE: Dict[Tuple, Any] = {}


def _cached_data(dataset: str, preset: Preset, data_dir: Optional[str]):
    key = (dataset, preset.train_subset, data_dir)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # one dataset at a time per worker process
        _DATA_CACHE[key] = load_data(dataset, preset, data_dir)
    return _DATA_CACHE[key]


@contextlib.contextmanager
def _task_context(preset: Preset, log_path: Optional[Path]):
    """Threads and denormal flushing as the preset says; stdout, stderr and logging into the
    cell's log file (so concurrent cells never interleave on the driver's terminal)."""
    old_threads = torch.get_num_threads()
    if preset.threads:
        torch.set_num_threads(preset.threads)
    torch.set_flush_denormal(True)
    if log_path is None:
        try:
            yield
        finally:
            torch.set_num_threads(old_threads)
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as f:
        handler = logging.StreamHandler(f)
        root = logging.getLogger()
        root.addHandler(handler)
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} host={socket.gethostname()} pid={os.getpid()} "
                f"threads={torch.get_num_threads()}\n")
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        except BaseException:
            f.write(traceback.format_exc())
            raise
        finally:
            root.removeHandler(handler)
            torch.set_num_threads(old_threads)


def train_base(preset: Preset, arch: str, dataset: str, seed: int, out_dir: str,
               data_dir: Optional[str] = None, device: str = "cpu") -> Dict[str, Any]:
    """Task: the dense base model of pipeline-A methods for (dataset, arch, seed), trained once
    and saved in ``OUT/base/`` (loaded there if it exists). Returns its info (epochs, seconds)."""
    out = Path(out_dir)
    log_path = out / "logs" / f"base-{dataset}-{arch}-seed{seed}.log"
    with _task_context(preset, log_path):
        data = _cached_data(dataset, preset, data_dir)
        _, info = get_base_model(preset, arch, dataset, data, seed, out, device=resolve_device(device),
                                 progress=False, log=print)
        return {"path": str(_base_path(out, preset, arch, dataset, seed)),
                "train_seconds": info.get("train_seconds"), "epochs": info.get("epochs")}


def run_cell(preset: Preset, cell: Cell, out_dir: str, data_dir: Optional[str] = None, device: str = "cpu",
             config: Optional[Dict[str, Any]] = None, env: Optional[Dict[str, Any]] = None,
             log_to_file: bool = True) -> Dict[str, Any]:
    """Task: prune (or, for the dense reference, train) one cell, evaluate its robustness,
    convert it with ``apb_sparse.sparsify``, save its checkpoint; return its result record.

    Latency is not measured here (concurrent cells would disturb it): the driver times every
    deployed model of the run in one exclusive phase afterwards (:func:`time_deployed`).

    The dense reference (method "dense") is adversarially trained from the cell's initialisation
    for the recipe's *total* epoch budget, the budget of every method (pipeline A: base + prune +
    finetune; B/D: the same total from scratch).
    """
    from .. import methods as registry
    from ..train import train

    out = Path(out_dir)
    dev = resolve_device(device)
    log_path = out / "logs" / f"{cell.id}.log" if log_to_file else None
    with _task_context(preset, log_path):
        print(f"cell {cell.id} on {dev}")
        t0, c0 = time.perf_counter(), time.process_time()
        data = _cached_data(cell.dataset, preset, data_dir)
        input_shape = tuple(int(s) for s in data.input_shape)
        recipe = make_recipe(preset, cell.arch, cell.dataset, cell.seed, progress=False)
        prune_log: Dict[str, Any] = {}
        extra: Dict[str, Any] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cell.seed)
            if cell.method == DENSE:
                model = build_model(preset, cell.arch, data, cell.seed).to(dev)
                epochs = recipe.total_epochs
                print(f"[dense] adversarially training the dense reference: {epochs} epochs "
                      f"(= every method's budget) {recipe.mode.upper()} {preset.norm} eps={preset.eps:.4g}")
                tlog = train(model, data, recipe.train_config(epochs, lr=recipe.lr), progress=False)
                model.eval()
                prune_seconds = time.perf_counter() - t0
                extra = {"role": "dense reference, trained with every method's total epoch budget",
                         "epochs": epochs, "train_log": tlog.to_dict(),
                         "budget": training_budget([{"phase": "dense training", "epochs": epochs,
                                                     "steps": tlog.steps, "lr": recipe.lr,
                                                     "scheduler": recipe.scheduler}])}
            elif cell.method == DENSE_BASE:
                base_file = _base_path(out, preset, cell.arch, cell.dataset, cell.seed)
                if not base_file.is_file():
                    raise RuntimeError(f"dense base model {base_file} missing (it is trained before the "
                                       "pipeline-A cells; on a cluster the run folder must be shared storage)")
                model, _ = load_checkpoint(base_file)
                model = model.to(dev).eval()
                base_info = json.loads(base_file.with_suffix(".json").read_text())
                prune_seconds = 0.0
                extra = {"role": "dense base of the pipeline-A methods (the model they prune)",
                         "epochs": base_info.get("epochs"),
                         "budget": training_budget([{"phase": "dense base", "epochs": base_info.get("epochs"),
                                                     "steps": (base_info.get("train_log") or {}).get("steps"),
                                                     "lr": recipe.lr, "scheduler": recipe.scheduler}])}
            else:
                cls = registry.get(cell.method)
                if cls.tags.pipeline == "A":
                    base_file = _base_path(out, preset, cell.arch, cell.dataset, cell.seed)
                    if not base_file.is_file():
                        raise RuntimeError(f"dense base model {base_file} missing (it is trained before the "
                                           "pipeline-A cells; on a cluster the run folder must be shared storage)")
                    base, _ = load_checkpoint(base_file)
                    res = cls().prune(base.to(dev), data, sparsity=cell.sparsity, structure=cell.structure,
                                      recipe=recipe, pretrained=True)
                else:
                    init = build_model(preset, cell.arch, data, cell.seed).to(dev)
                    res = cls().prune(init, data, sparsity=cell.sparsity, structure=cell.structure,
                                      recipe=recipe, pretrained=False)
                model = res.model
                if cls.tags.pipeline == "A":
                    base_info = json.loads(base_file.with_suffix(".json").read_text())
                    base_phase = {"phase": "dense base (shared)", "epochs": base_info.get("epochs"),
                                  "steps": (base_info.get("train_log") or {}).get("steps"),
                                  "lr": recipe.lr, "scheduler": recipe.scheduler}
                    extra["budget"] = training_budget([base_phase] + res.log.get("phases", []))
                else:
                    extra["budget"] = training_budget(res.log.get("phases", []))
                prune_seconds = res.log.get("seconds", time.perf_counter() - t0)
                prune_log = {k: res.log.get(k) for k in ("target_sparsity", "sparsity", "sparsity_all",
                                                        "hparams", "seconds")}
                prune_log["phases"] = [{k: v for k, v in p.items() if k != "train_log"}
                                       for p in res.log.get("phases", [])]
        t1 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cell.seed)
            # Per-layer paths by the analytic cost model here: measuring them would be disturbed by
            # the concurrent cells; the timing phase re-chooses them by measurement.
            from .. import densify, sparsify
            deployed = sparsify(densify(model).cpu().eval())
            measured, sparse_model = evaluate_model(model, data, preset, seed=cell.seed, device=dev,
                                                    input_shape=input_shape, latency=False,
                                                    sparse_model=deployed)
        flags = measured.pop("flags")
        if cell.method not in REFERENCES and abs(prune_log.get("sparsity", cell.sparsity) - cell.sparsity) > 0.005:
            flags.append("sparsity!=target")
        ckpt = out / "checkpoints" / f"{cell.id}.safetensors"
        save_checkpoint(sparse_model, ckpt, arch=cell.arch, num_classes=int(data.num_classes),
                        in_channels=int(data.input_shape[0]), model_kwargs=preset.model_kwargs,
                        extra={"method": cell.method, "structure": cell.structure, "sparsity": cell.sparsity,
                               "seed": cell.seed, "dataset": cell.dataset})
        record = {"method": cell.method, "arch": cell.arch, "dataset": cell.dataset, "structure": cell.structure,
                  "sparsity": cell.sparsity, "seed": cell.seed, "tags": _method_tags(cell.method),
                  "input_shape": list(input_shape), **extra, **measured, "flags": flags, "prune": prune_log,
                  "seconds": {"prune": prune_seconds, "evaluate": time.perf_counter() - t1,
                              "cell": time.perf_counter() - t0,
                              # CPU seconds of the worker process: on a shared machine, what the
                              # cell would take alone (one thread)
                              "cpu": time.process_time() - c0},
                  "checkpoint": str(ckpt.relative_to(out)), "device": str(dev), "worker": {"host": socket.gethostname(),
                                                                        "pid": os.getpid()},
                  "config": config or {}, "environment": env or {}}
        print(f"done in {record['seconds']['cell']:.1f} s (prune/train {prune_seconds:.1f} s): clean "
              f"{record['clean_accuracy']:.4f}, robust {record['robust_accuracy']:.4f}, sparsity "
              f"{record['measured_sparsity']:.4f}, flags {flags}")
        return record


# ----------------------------------------------------------------------------------- timing
def time_deployed(records: Sequence[Dict[str, Any]], out_dir, preset: Preset, *,
                  log: Callable[[str], None] = print) -> Dict[Tuple, Dict[str, Any]]:
    """The exclusive timing phase: every deployed model of the run, interleaved, on this machine.

    Runs on the driver when no cell is training. For each (dataset, arch) one dense baseline
    (the dense reference's weights) is timed in every round, deployed like the sparse models
    (BatchNorm folded, ReLU fused: the speedup is what the sparsity buys) and as eager torch
    (``speedup_vs_eager``), next to each cell's deployment model:
    ``apb_sparse.deploy(model, x, path=<the checkpoint's per-layer paths>)`` (BatchNorm folded,
    ReLU / residual add fused, TorchScript graph), the same form as the dense baseline
    ``deploy(dense, x, path="dense")``. Each round calls every model for ``preset.latency_min_time``
    seconds; ``preset.latency_rounds`` rounds. The speedup of a cell is the folded dense median over
    its median; its spread is the interquartile range (and min / max) of the per-round ratios
    (dense and sparse from the same round).

    Returns:
        cell key -> ``{"cpu": {...}}`` (and ``"cuda"`` when a GPU is present), to be stored as the
        records' ``latency``.
    """
    from .. import deploy, densify
    from . import interleaved_medians

    out_dir = Path(out_dir)
    threads = preset.latency_threads or preset.threads
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    result: Dict[Tuple, Dict[str, Any]] = {}
    try:
        # Build the deployed models once, on CPU; check each against its dense-with-zeros model.
        models: Dict[str, Tuple[nn.Module, Tuple]] = {}
        inputs: Dict[Tuple[str, str], Tensor] = {}
        baselines: Dict[Tuple[str, str], nn.Module] = {}
        checks: Dict[str, Dict[str, Any]] = {}
        for r in sorted(records, key=lambda r: (r["method"] != DENSE, r["seed"])):
            ckpt = out_dir / r.get("checkpoint", "")
            if not r.get("checkpoint") or not ckpt.is_file():
                continue
            model, cfg = load_checkpoint(ckpt)
            dz = densify(model).eval()
            da = (r["dataset"], r["arch"])
            if da not in inputs:
                shape = _input_shape_of(dz, cfg, r)
                gen = torch.Generator().manual_seed(0)
                inputs[da] = torch.rand((preset.latency_batch, *shape), generator=gen)
                # The dense reference's weights (or, without one, any cell's: zeros do not change
                # the time of a dense kernel) as the baseline.
                baselines[da] = dz
            x = inputs[da]
            # The per-layer paths saved with the checkpoint (chosen by the analytic cost model):
            # measuring them here instead ("calibrate") proved worse on a loaded machine, where
            # three noisy rounds per layer sent half of the 95 %-sparse layers to the dense path.
            deployed = deploy(dz, x, path=cfg.get("paths") or "auto")
            with torch.inference_mode():
                ref, got = dz(x), deployed(x)
            diff = float((got - ref).abs().max())
            cid = cell_id(cell_key(r))
            checks[cid] = {"max_abs_diff": diff, "outputs_match": diff <= 1e-3 * max(1.0, float(ref.abs().max())),
                           "paths": {n: c.path for n, c in getattr(deployed, "apb_sparse_choices", {}).items()}}
            models[cid] = (deployed, da, cell_key(r))
        if not models:
            return result
        for dev in devices:
            sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
            fns: Dict[str, Callable[[], Any]] = {}
            xs = {da: x.to(dev) for da, x in inputs.items()}
            # Batch 1 (one request at a time) beside the preset's batch: the same deployed
            # snapshots, which keep one TorchScript graph per input signature.
            x1s = {da: x[:1].clone() for da, x in xs.items()}
            for da, base in baselines.items():
                b = copy.deepcopy(base).to(dev).eval()
                bf = deploy(base.to(dev), xs[da], path="dense")
                fns[f"dense:{da}"] = (lambda b=b, x=xs[da]: b(x))
                fns[f"dense-fused:{da}"] = (lambda b=bf, x=xs[da]: b(x))
                fns[f"b1:dense-fused:{da}"] = (lambda b=bf, x=x1s[da]: b(x))
            for cid, (m, da, _) in models.items():
                md = m.to(dev) if dev.type == "cuda" else m
                fns[cid] = (lambda m=md, x=xs[da]: m(x))
                fns[f"b1:{cid}"] = (lambda m=md, x=x1s[da]: m(x))
            # One CPU thread: time the process's CPU time, which on a machine shared with other
            # jobs leaves out the time slices given to them (and equals the wall time on an idle
            # one); with more threads or on a GPU only the wall clock says what a user waits.
            cpu_clock = dev.type == "cpu" and torch.get_num_threads() == 1
            clock = time.process_time if cpu_clock else time.perf_counter
            t0 = time.perf_counter()
            try:
                t = interleaved_medians(fns, rounds=preset.latency_rounds, warmup=1,
                                        min_time=preset.latency_min_time, sync=sync, clock=clock)
            except Exception as e:  # e.g. CUDA kernels not built: say so, keep the CPU numbers
                if dev.type == "cpu":
                    raise
                for cid, (_, _, key) in models.items():
                    result.setdefault(key, {})[dev.type] = {"error": f"{type(e).__name__}: {e}"}
                continue
            seconds = time.perf_counter() - t0
            log(f"[timing] {len(models)} deployed model(s) + {len(baselines)} dense baseline(s) on {dev}: "
                f"{preset.latency_rounds} interleaved rounds in {seconds:.1f} s")
            for cid, (_, da, key) in models.items():
                d_times, df_times, s_times = t[f"dense:{da}"]["times_s"], t[f"dense-fused:{da}"]["times_s"], t[cid]["times_s"]
                # The baseline is the dense model deployed the same way (BatchNorm folded, ReLU
                # fused): the speedup is what the sparsity buys; eager torch is the second baseline.
                ratios = [d / s for d, s in zip(df_times, s_times)]
                ratios_e = [d / s for d, s in zip(d_times, s_times)]
                d_med, df_med, s_med = (statistics.median(v) for v in (d_times, df_times, s_times))
                b1d_times, b1s_times = t[f"b1:dense-fused:{da}"]["times_s"], t[f"b1:{cid}"]["times_s"]
                ratios_b1 = [d / s for d, s in zip(b1d_times, b1s_times)]
                b1d_med, b1s_med = statistics.median(b1d_times), statistics.median(b1s_times)
                result.setdefault(key, {})[dev.type] = {
                    "device": str(dev), "batch": preset.latency_batch, "rounds": preset.latency_rounds,
                    "threads": torch.get_num_threads() if dev.type == "cpu" else None,
                    "phase": "exclusive", "models_timed": len(models),
                    "clock": "process CPU time" if cpu_clock else "wall clock",
                    "baseline": LATENCY_BASELINE,
                    "dense_ms": df_med * 1e3, "dense_eager_ms": d_med * 1e3, "sparse_ms": s_med * 1e3,
                    "speedup": df_med / s_med, "speedup_vs_eager": d_med / s_med,
                    "speedup_q25": _quantile(ratios, 0.25), "speedup_q75": _quantile(ratios, 0.75),
                    "speedup_min": min(ratios), "speedup_max": max(ratios),
                    "speedup_vs_eager_q25": _quantile(ratios_e, 0.25), "speedup_vs_eager_q75": _quantile(ratios_e, 0.75),
                    "sparse_ms_q25": _quantile(s_times, 0.25) * 1e3, "sparse_ms_q75": _quantile(s_times, 0.75) * 1e3,
                    "dense_times_ms": [v * 1e3 for v in df_times], "dense_eager_times_ms": [v * 1e3 for v in d_times],
                    "sparse_times_ms": [v * 1e3 for v in s_times],
                    "batch1": {"dense_ms": b1d_med * 1e3, "sparse_ms": b1s_med * 1e3,
                               "speedup": b1d_med / b1s_med, "speedup_q25": _quantile(ratios_b1, 0.25),
                               "speedup_q75": _quantile(ratios_b1, 0.75),
                               "dense_times_ms": [v * 1e3 for v in b1d_times],
                               "sparse_times_ms": [v * 1e3 for v in b1s_times]},
                    **checks[cid],
                }
            for m, _, _ in models.values():
                m.cpu()
    finally:
        torch.set_num_threads(old_threads)
    return result


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty list."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _input_shape_of(model: nn.Module, cfg: Dict[str, Any], record: Dict[str, Any]) -> Tuple[int, ...]:
    shape = record.get("input_shape")
    if shape:
        return tuple(int(s) for s in shape)
    return tuple(int(s) for s in _DATASET_SHAPES.get(record["dataset"], (cfg["in_channels"], 32, 32)))


_DATASET_SHAPES = {"digits": (1, 8, 8), "fashion-mnist": (1, 28, 28), "mnist": (1, 28, 28),
                   "cifar10": (3, 32, 32), "svhn": (3, 32, 32)}


# ----------------------------------------------------------------------------------- the driver
def run_benchmark(preset: Preset, out_dir, *, methods: Sequence[str], structures: Sequence[str],
                  sparsities: Dict[str, Sequence[float]], seeds: Sequence[int], archs: Sequence[str],
                  datasets: Sequence[str], data_dir: Optional[str] = None, device: str = "auto",
                  progress: bool = True, latency: bool = True, plots: bool = True,
                  log: Callable[[str], None] = print, executor: Any = "local",
                  workers: Optional[int] = None, ray_address: Optional[str] = None,
                  cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0, max_retries: int = 3) -> RunSummary:
    """Run (or resume) the benchmark grid and write results, checkpoints and the leaderboard.

    Args:
        executor: "local" (cells one after another in this process), "ray" (cells as Ray tasks,
            ``workers`` at a time), "auto" (Ray when installed on a multi-core machine), or an
            :class:`~apb_sparse.bench.executors.Executor` instance (left running).
        workers, ray_address, cpus_per_cell, gpus_per_cell, max_retries: see
            :class:`~apb_sparse.bench.executors.RayExecutor`.

    Phases: (1) the dense base model of every (dataset, arch, seed) with pipeline-A cells is trained
    once (concurrently across seeds) and saved in ``OUT/base/``; (2) the cells run, each
    pipeline-A cell as soon as its base is on disk, and the driver appends each returned record
    to ``OUT/results.jsonl`` (fsync); (3) the driver times every deployed model of the grid in one
    exclusive interleaved pass (:func:`time_deployed`) and appends the records again with their
    latency (the last record of a cell wins); (4) the leaderboard is written.
    A cell that raises is recorded in ``OUT/failed.jsonl`` and ``OUT/errors.log`` (and runs again
    on resume); Ctrl-C keeps every finished cell.
    """
    from tqdm.auto import tqdm

    from . import environment
    from .executors import Executor, make_executor
    from .leaderboard import write_leaderboard

    t_start = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_run_config(out_dir, preset)
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if preset.threads:
        torch.set_num_threads(preset.threads)
    torch.set_flush_denormal(True)
    store = ResultsStore(out_dir / "results.jsonl")
    dropped = store.repair()
    if dropped:
        log(f"{store.path}: dropped {dropped} unreadable line(s) left by an interrupted write "
            f"(kept in {store.path}.bad); their cells run again")
    done = store.done()
    cells = plan_cells(preset, methods=methods, structures=structures, sparsities=sparsities, seeds=seeds,
                       archs=archs, datasets=datasets)
    todo = [c for c in cells if c.key not in done]
    summary = RunSummary(out_dir, skipped=[c.key for c in cells if c.key in done])

    own_executor = not isinstance(executor, Executor)
    ex = make_executor(executor, workers=workers, address=ray_address, cpus_per_cell=cpus_per_cell,
                       gpus_per_cell=gpus_per_cell, max_retries=max_retries) if own_executor else executor
    summary.executor = ex.name
    # The local executor trains here: check the device now. Ray tasks resolve it where they run
    # (a CPU-only driver may drive GPU workers); each record says which device it used.
    dev = resolve_device(device) if ex.name == "local" else device
    say = (lambda s: tqdm.write(s)) if progress else log
    try:
        env = environment()
        env["device"] = str(dev)  # for Ray: as requested; the record's "device" is what the task used
        config = {"preset": preset.to_dict(), "identity_hash": preset.identity_hash(), "device": str(dev),
                  "methods": list(methods), "structures": list(structures),
                  "sparsities": {k: list(v) for k, v in sparsities.items()}, "seeds": list(seeds),
                  "argv": sys.argv, "executor": ex.name, "workers": ex.workers}
        log(f"apb run --preset {preset.name}: {len(cells)} cells, {len(summary.skipped)} already in "
            f"{store.path}, {len(todo)} to run on {dev}; {ex.describe()}; per-cell logs in {out_dir / 'logs'}")

        _run_cells(todo, preset, out_dir, store, summary, ex, config=config, env=env, dev=dev,
                   data_dir=data_dir, progress=progress, say=say)

        if latency:
            latest = store.latest()
            planned = [latest[c.key] for c in cells if c.key in latest]
            if planned and (summary.ran or any("latency" not in r for r in planned)):
                t0 = time.perf_counter()
                timings = time_deployed(planned, out_dir, preset, log=say)
                for r in planned:
                    lat = timings.get(cell_key(r))
                    if lat is None:
                        continue
                    r = dict(r, latency=lat, flags=[f for f in r.get("flags", []) if f != "latency-output-mismatch"]
                             + ([] if lat["cpu"].get("outputs_match", True) else ["latency-output-mismatch"]))
                    store.append(r)
                summary.timed = len(timings)
                summary.timing_seconds = time.perf_counter() - t0
    except KeyboardInterrupt:
        ex.cancel_all()
        raise
    finally:
        if own_executor:
            ex.shutdown()
    summary.files = write_leaderboard(store.records(), out_dir, plots=plots)
    summary.seconds = time.perf_counter() - t_start
    return summary


def _run_cells(todo: List[Cell], preset, out_dir: Path, store: ResultsStore, summary: RunSummary, ex, *,
               config, env, dev, data_dir, progress, say) -> None:
    """Phases 1 and 2: base models, then cells (a pipeline-A cell once its base is on disk)."""
    from tqdm.auto import tqdm

    from .. import methods as registry
    from .executors import Task
    from .leaderboard import write_leaderboard

    def needs_base(c: Cell) -> bool:
        return c.method == DENSE_BASE or (c.method != DENSE and registry.get(c.method).tags.pipeline == "A")

    bases_needed = []
    for c in todo:
        g = (c.dataset, c.arch, c.seed)
        if needs_base(c) and g not in bases_needed:
            bases_needed.append(g)
    base_ready = {g for g in bases_needed
                  if _base_path(out_dir, preset, g[1], g[0], g[2]).is_file()
                  and _base_path(out_dir, preset, g[1], g[0], g[2]).with_suffix(".json").is_file()}
    base_failed: Dict[Tuple, str] = {}
    queue: List[Task] = [Task(("base", g), train_base, (preset, g[1], g[0], g[2], str(out_dir), data_dir, str(dev)),
                              f"base {g[0]}/{g[1]} seed {g[2]}") for g in bases_needed if g not in base_ready]
    queue += [Task(("cell", c), run_cell, (preset, c, str(out_dir), data_dir, str(dev), config, env),
                   f"{c.method} {c.structure[:2]} s={c.sparsity:g} seed {c.seed}") for c in todo]
    bar = tqdm(total=len(todo), desc="cells", disable=not progress, dynamic_ncols=True, unit="cell")

    def ready(task: Task) -> bool:
        kind, obj = task.key
        if kind == "base":
            return True
        g = (obj.dataset, obj.arch, obj.seed)
        return not needs_base(obj) or g in base_ready or g in base_failed

    def fail(cell: Cell, err: str, tb: str) -> None:
        summary.failed.append((cell.key, err))
        with open(out_dir / "errors.log", "a") as f:
            f.write(f"== {cell.id} ({time.strftime('%Y-%m-%d %H:%M:%S')}) ==\n{tb or err}\n")
        rec = {"method": cell.method, "arch": cell.arch, "dataset": cell.dataset, "structure": cell.structure,
               "sparsity": cell.sparsity, "seed": cell.seed, "error": err, "time_utc": env.get("time_utc")}
        ResultsStore(out_dir / "failed.jsonl").append(rec)
        say(f"FAILED {cell.id}: {err} (traceback in {out_dir / 'errors.log'}, log in {out_dir / 'logs' / (cell.id + '.log')})")

    def postfix() -> None:
        bar.set_postfix_str(f"running {ex.running()}, failed {len(summary.failed)}")

    try:
        while queue or ex.running():
            while ex.running() < ex.workers:
                nxt = next((t for t in queue if ready(t)), None)
                if nxt is None:
                    break
                queue.remove(nxt)
                kind, obj = nxt.key
                if kind == "cell" and needs_base(obj) and (obj.dataset, obj.arch, obj.seed) in base_failed:
                    fail(obj, f"dense base model failed: {base_failed[(obj.dataset, obj.arch, obj.seed)]}", "")
                    bar.update(1)
                    continue
                ex.submit(nxt)
                postfix()
            if not ex.running():
                if queue:  # pragma: no cover - every task becomes ready once the bases are done
                    raise RuntimeError(f"no runnable task among {[t.label for t in queue]}")
                break
            outcome = ex.next_done()
            kind, obj = outcome.task.key
            if kind == "base":
                if outcome.error:
                    base_failed[obj] = outcome.error
                    with open(out_dir / "errors.log", "a") as f:
                        f.write(f"== base {obj} ==\n{outcome.traceback or outcome.error}\n")
                    say(f"FAILED dense base {obj}: {outcome.error}")
                else:
                    base_ready.add(obj)
                    say(f"[base] {obj[0]}/{obj[1]} seed {obj[2]}: ready ({outcome.value.get('epochs')} epochs, "
                        f"{outcome.value.get('train_seconds') or 0:.1f} s)")
                postfix()
                continue
            cell = obj
            if outcome.error:
                fail(cell, outcome.error, outcome.traceback)
            else:
                record = outcome.value
                record["config"] = config  # the driver's view (executor, workers) for every record
                store.append(record)
                summary.ran.append(cell.key)
                msg = (f"{cell.method:<11} {cell.structure:<12} s={cell.sparsity:<5g} seed {cell.seed}  clean "
                       f"{100 * record['clean_accuracy']:5.1f}%  AA {100 * record['robust_accuracy']:5.1f}%  "
                       f"d_med {record['min_norm']['median_distance']:.3f}  ({record['seconds']['cell']:.1f} s)"
                       f"{'  [' + ' '.join(record['flags']) + ']' if record['flags'] else ''}")
                say(msg)
                try:
                    write_leaderboard(store.records(), out_dir, plots=False)
                except Exception as e:  # pragma: no cover - never lose the run to a report bug
                    say(f"leaderboard not written: {e}")
            bar.update(1)
            postfix()
    finally:
        bar.close()
