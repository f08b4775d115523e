"""The benchmark behind ``apb run``: one dense adversarial base model, every method at every
sparsity, robustness and measured speed of each pruned model, resumable.

For each (dataset, arch, seed):

1. the dense base model is adversarially trained once with the preset's recipe and cached in
   ``OUT/base/`` (a rerun loads it); it is evaluated like every pruned model (the "dense" row);
2. for each (structure, sparsity, method) not yet in ``OUT/results.jsonl``: the method prunes
   (pipeline A starts from the base model, pipelines B/D from the same initialisation with the
   same total epoch budget), then :func:`evaluate_model`:

   * sparsity actually reached (``sparsity_report``) and the per-layer sparse paths;
   * clean and robust accuracy (AutoAttack standard, or the preset's cheaper custom subset);
   * minimum-norm FMN distances -> median distance and security curve, with the
     gradient-masking checks of ``apb_sparse.robustness.evaluate``;
   * ``apb_sparse.sparsify`` -> agreement of the sparse model with the dense-with-zeros model,
     latency dense vs sparse (interleaved medians, CPU and CUDA when present), state-dict sizes;

   the record is appended to the JSONL file and the checkpoint saved (nonzeros only);
3. the leaderboard (Markdown, CSV, HTML) and plots are rewritten.

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
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .checkpoint import load_checkpoint, save_checkpoint, save_state_dict, state_dict_bytes
from .presets import STRUCTURES, Preset
from .results import ResultsStore, atomic_write_text, cell_id, cell_key

__all__ = ["resolve_device", "load_data", "build_model", "make_recipe", "get_base_model",
           "quick_autoattack", "robustness", "measure_latency", "evaluate_model", "Cell",
           "plan_cells", "run_benchmark", "RunSummary"]

DENSE = "dense"


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


def robustness(model: nn.Module, data, preset: Preset, *, seed: int = 0) -> Dict[str, Any]:
    """AutoAttack (standard or the quick subset) and FMN min-norm with masking checks.

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

    grid = [preset.curve_max * i / 49 for i in range(50)]
    fmn = evaluate(model, data, attack="fmn", norm=preset.norm, eps=preset.eps, n_samples=preset.fmn_samples,
                   batch_size=preset.eval_batch, seed=seed, fmn_steps=preset.fmn_steps, eps_grid=grid,
                   checks=True, check_samples=preset.check_samples, square_queries=preset.square_queries)
    d = fmn.distances
    finite = d[torch.isfinite(d)]
    median = float(d.median()) if d.numel() else float("nan")
    mn = {"attack": "fmn", "n_samples": fmn.n_samples, "steps": preset.fmn_steps,
          "median_distance": median, "robust_at_eps": fmn.robust_accuracy,
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
def measure_latency(dense: nn.Module, sparse: nn.Module, input_shape: Sequence[int], *, batch: int,
                    rounds: int, device: torch.device) -> Dict[str, Any]:
    """Median inference latency of the dense and the sparse model, interleaved, same run.

    Outputs are compared first (a fast wrong model is not a result).
    """
    from . import interleaved_medians

    dense = copy.deepcopy(dense).to(device).eval()
    sparse = copy.deepcopy(sparse).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch, *input_shape), generator=gen).to(device)
    with torch.inference_mode():
        ref = dense(x)
        diff = float((sparse(x) - ref).abs().max())
        scale = max(1.0, float(ref.abs().max()))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = interleaved_medians({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, rounds=rounds, warmup=2,
                            min_time=0.02, sync=sync)
    d, s = t["dense"]["median_s"], t["sparse"]["median_s"]
    return {"device": str(device), "batch": batch, "rounds": rounds, "dense_ms": d * 1e3, "sparse_ms": s * 1e3,
            "speedup": d / s, "dense_times_ms": [v * 1e3 for v in t["dense"]["times_s"]],
            "sparse_times_ms": [v * 1e3 for v in t["sparse"]["times_s"]], "max_abs_diff": diff,
            "outputs_match": diff <= 1e-3 * scale}


def evaluate_model(model: nn.Module, data, preset: Preset, *, seed: int = 0, device: torch.device,
                   input_shape: Sequence[int], latency: bool = True, robust: bool = True,
                   sparse_model: Optional[nn.Module] = None) -> Tuple[Dict[str, Any], nn.Module]:
    """Everything measured on one model (dense, masked or dense-with-zeros).

    Returns:
        ``(record_part, sparse_model)``: the measured sparsity, robustness, sparse/dense agreement,
        latency and sizes, and the ``apb_sparse.sparsify`` deployment model.
    """
    from .. import densify, sparsify, sparsity_report

    dense = densify(model).to(device).eval()
    n_check = max(preset.aa_samples, 1)
    if hasattr(data, "tensors"):
        xc, _ = data.tensors("test", n_check)
    else:
        xc = data[0][:n_check]
    bs = preset.latency_batch  # the deployment batch size, as timed below
    if sparse_model is None:
        # Per-layer paths measured on the deployment batch (not the analytic cost model): on
        # small layers the dense kernel can win even at high sparsity.
        sparse_model = sparsify(dense.cpu(), calibrate=xc[:bs].cpu()).eval()
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

    if robust:
        rob = robustness(dense, data, preset, seed=seed)
        out["flags"] += rob.pop("flags")
        out.update(rob)
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
    return out, sparse_model


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


def plan_cells(preset: Preset, *, methods: Sequence[str], structures: Sequence[str],
               sparsities: Dict[str, Sequence[float]], seeds: Sequence[int], archs: Sequence[str],
               datasets: Sequence[str]) -> List[Cell]:
    """Every cell of the grid, dense rows first, sparsity-major (an interrupted run still has
    every method at the lower sparsities). Methods that do not support a structure are left out."""
    from .. import methods as registry

    cells: List[Cell] = []
    for dataset in datasets:
        for arch in archs:
            for seed in seeds:
                cells.append(Cell(DENSE, arch, dataset, "none", 0.0, seed))
                for structure in structures:
                    for s in sparsities.get(structure, ()):
                        for m in methods:
                            if structure in registry.get(m).structures:
                                cells.append(Cell(m.lower(), arch, dataset, structure, float(s), seed))
    return cells


@dataclass
class RunSummary:
    out_dir: Path
    ran: List[Tuple] = field(default_factory=list)
    skipped: List[Tuple] = field(default_factory=list)
    failed: List[Tuple[Tuple, str]] = field(default_factory=list)
    seconds: float = 0.0
    files: Dict[str, str] = field(default_factory=dict)


def _method_tags(name: str) -> Optional[Dict[str, Any]]:
    if name == DENSE:
        return None
    from .. import methods as registry

    return registry.get(name).tags.as_dict()


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


def run_benchmark(preset: Preset, out_dir, *, methods: Sequence[str], structures: Sequence[str],
                  sparsities: Dict[str, Sequence[float]], seeds: Sequence[int], archs: Sequence[str],
                  datasets: Sequence[str], data_dir: Optional[str] = None, device: str = "auto",
                  progress: bool = True, latency: bool = True, plots: bool = True,
                  log: Callable[[str], None] = print) -> RunSummary:
    """Run (or resume) the benchmark grid and write results, checkpoints and the leaderboard."""
    from tqdm.auto import tqdm

    from .. import methods as registry
    from .. import sparsify
    from . import environment
    from .leaderboard import write_leaderboard

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_run_config(out_dir, preset)
    dev = resolve_device(device)
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
    env = environment()
    env["device"] = str(dev)
    config = {"preset": preset.to_dict(), "identity_hash": preset.identity_hash(), "device": str(dev),
              "methods": list(methods), "structures": list(structures),
              "sparsities": {k: list(v) for k, v in sparsities.items()}, "seeds": list(seeds),
              "argv": sys.argv}
    log(f"apb run --preset {preset.name}: {len(cells)} cells, {len(summary.skipped)} already in "
        f"{store.path}, {len(todo)} to run on {dev} ({torch.get_num_threads()} CPU threads)")

    groups: Dict[Tuple[str, str, int], List[Cell]] = {}
    for c in todo:
        groups.setdefault((c.dataset, c.arch, c.seed), []).append(c)
    bar = tqdm(total=len(todo), desc="cells", disable=not progress, dynamic_ncols=True)
    _run_groups(groups, preset, out_dir, store, summary, bar, config=config, env=env, dev=dev,
                data_dir=data_dir, progress=progress, latency=latency, log=log)
    bar.close()
    summary.files = write_leaderboard(store.records(), out_dir, plots=plots)
    summary.seconds = time.perf_counter() - t_start
    return summary


def _run_groups(groups, preset, out_dir, store, summary, bar, *, config, env, dev, data_dir, progress, latency, log):
    from tqdm.auto import tqdm

    from .. import methods as registry
    from .leaderboard import write_leaderboard

    for (dataset, arch, seed), group in groups.items():
        data = load_data(dataset, preset, data_dir)
        input_shape = tuple(int(s) for s in data.input_shape)
        base, base_info = get_base_model(preset, arch, dataset, data, seed, out_dir, device=dev,
                                         progress=progress, log=lambda s: tqdm.write(s) if progress else log(s))
        recipe = make_recipe(preset, arch, dataset, seed, progress=progress)
        for cell in group:
            bar.set_description(f"{cell.method} {cell.structure[:2]} s={cell.sparsity:g}")
            t0 = time.perf_counter()
            try:
                prune_log: Dict[str, Any] = {}
                if cell.method == DENSE:
                    model = base
                    prune_seconds = base_info.get("train_seconds", 0.0)
                else:
                    cls = registry.get(cell.method)
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)
                        if cls.tags.pipeline == "A":
                            res = cls().prune(base, data, sparsity=cell.sparsity, structure=cell.structure,
                                              recipe=recipe, pretrained=True)
                        else:
                            init = build_model(preset, arch, data, seed).to(dev)
                            res = cls().prune(init, data, sparsity=cell.sparsity, structure=cell.structure,
                                              recipe=recipe, pretrained=False)
                    model = res.model
                    prune_seconds = res.log.get("seconds", time.perf_counter() - t0)
                    prune_log = {k: res.log.get(k) for k in ("target_sparsity", "sparsity", "sparsity_all",
                                                            "hparams", "seconds")}
                    prune_log["phases"] = [{k: v for k, v in p.items() if k != "train_log"}
                                           for p in res.log.get("phases", [])]
                t1 = time.perf_counter()
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    measured, sparse_model = evaluate_model(model, data, preset, seed=seed, device=dev,
                                                            input_shape=input_shape, latency=latency)
                flags = measured.pop("flags")
                if cell.method != DENSE and abs(prune_log.get("sparsity", cell.sparsity) - cell.sparsity) > 0.005:
                    flags.append("sparsity!=target")
                ckpt = out_dir / "checkpoints" / f"{cell.id}.safetensors"
                save_checkpoint(sparse_model, ckpt, arch=arch, num_classes=int(data.num_classes),
                                in_channels=int(data.input_shape[0]), model_kwargs=preset.model_kwargs,
                                extra={"method": cell.method, "structure": cell.structure,
                                       "sparsity": cell.sparsity, "seed": seed, "dataset": dataset})
                record = {"method": cell.method, "arch": arch, "dataset": dataset, "structure": cell.structure,
                          "sparsity": cell.sparsity, "seed": seed, "tags": _method_tags(cell.method),
                          **measured, "flags": flags, "prune": prune_log,
                          "seconds": {"prune": prune_seconds, "evaluate": time.perf_counter() - t1,
                                      "cell": time.perf_counter() - t0},
                          "checkpoint": str(ckpt.relative_to(out_dir)), "config": config, "environment": env}
                store.append(record)
                summary.ran.append(cell.key)
                lat = record.get("latency", {}).get("cpu", {})
                msg = (f"{cell.method:<11} {cell.structure:<12} s={cell.sparsity:<5g} clean "
                       f"{100 * record['clean_accuracy']:5.1f}%  AA {100 * record['robust_accuracy']:5.1f}%  "
                       f"d_med {record['min_norm']['median_distance']:.3f}  "
                       f"speedup {lat.get('speedup', float('nan')):4.2f}x  ({record['seconds']['cell']:.1f} s)"
                       f"{'  [' + ' '.join(flags) + ']' if flags else ''}")
                tqdm.write(msg) if progress else log(msg)
            except KeyboardInterrupt:
                bar.close()
                raise
            except Exception as e:  # one broken method must not cost the others their results
                err = f"{type(e).__name__}: {e}"
                summary.failed.append((cell.key, err))
                tb = traceback.format_exc()
                with open(out_dir / "errors.log", "a") as f:
                    f.write(f"== {cell.id} ==\n{tb}\n")
                (tqdm.write if progress else log)(f"FAILED {cell.id}: {err} (traceback in {out_dir / 'errors.log'})")
            bar.update(1)
            try:
                write_leaderboard(store.records(), out_dir, plots=False)
            except Exception as e:  # pragma: no cover - never lose the run to a report bug
                (tqdm.write if progress else log)(f"leaderboard not written: {e}")
