"""One cell: the task functions an executor runs (:func:`run_cell`, :func:`train_base`)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from .. import densify, sparsify
from .. import methods as registry
from ..train import train
from .budget import training_budget
from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import evaluate_model
from .plan import DENSE, DENSE_BASE, REFERENCES, Cell
from .prepare import _base_path, build_model, get_base_model, load_data, make_recipe, resolve_device
from .presets import Preset


def _method_tags(name: str) -> Optional[Dict[str, Any]]:
    if name in REFERENCES:
        return None
    cls = registry.get(name)
    # The method's one-line differences from its authors' code go with its tags (leaderboard notes).
    return dict(cls.tags.as_dict(), notes=getattr(cls, "notes", "") or "", caveat=getattr(cls, "caveat", "") or "")

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
            deployed = sparsify(densify(model).cpu().eval())
            measured, sparse_model = evaluate_model(model, data, preset, seed=cell.seed, device=dev,
                                                    input_shape=input_shape, latency=False,
                                                    sparse_model=deployed)
        flags = measured.pop("flags")
        if cell.method not in REFERENCES and abs(prune_log.get("sparsity", cell.sparsity) - cell.sparsity) > 0.005:
            flags.append("sparsity!=target")
        ckpt = out / "checkpoints" / f"{cell.id}.safetensors"
        save_checkpoint(sparse_model, ckpt, arch=cell.arch, num_classes=int(data.num_classes),
                        in_channels=int(data.input_shape[0]), model_kwargs=preset.model_kwargs_for(cell.arch),
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
