"""Latency: one dense/sparse pair (:func:`measure_latency`) and the exclusive timing phase of a
run, every deployed model interleaved (:func:`time_deployed`)."""
from __future__ import annotations

import copy
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import DeployedModel, deploy, densify
from .checkpoint import load_checkpoint
from .plan import DENSE
from .presets import Preset
from .results import cell_id, cell_key
from .timing import interleaved_medians

# ----------------------------------------------------------------------------------- speed
LATENCY_BASELINE = ("the dense model deployed the same way (apb_sparse.deploy(dense, x, layout='dense'): BatchNorm "
                    "folded, TorchScript graph); speedup_vs_eager is against the eager dense model")


def measure_latency(dense: nn.Module, sparse: nn.Module, input_shape: Sequence[int], *, batch: int,
                    rounds: int, device: torch.device, tune: bool = False) -> Dict[str, Any]:
    """Median inference latency of the deployed dense and sparse models, interleaved, same run.

    Both are timed as :func:`apb_sparse.deploy` snapshots (the form the leaderboard times): the
    baseline is ``deploy(dense, x, layout="dense")``; ``speedup_vs_eager`` is against the eager dense
    model.  Outputs are compared first (a fast wrong model is not a result).  ``tune``: deploy the
    sparse model with ``tune=True`` (layouts by measured time); ignored for an already deployed one.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch, *input_shape), generator=gen).to(device)
    eager = copy.deepcopy(dense).to(device).eval()
    dense_d = deploy(eager, x, layout="dense")
    sparse_d = sparse if isinstance(sparse, DeployedModel) else deploy(copy.deepcopy(sparse).to(device).eval(), x,
                                                                       tune=tune)
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
            "tuned_layers": sum(1 for c in getattr(sparse_d, "apb_sparse_choices", {}).values() if c.measured_ms),
            "dense_times_ms": [v * 1e3 for v in t["dense"]["times_s"]],
            "sparse_times_ms": [v * 1e3 for v in t["sparse"]["times_s"]], "max_abs_diff": diff,
            "outputs_match": diff <= 1e-3 * scale}

# ----------------------------------------------------------------------------------- timing
def time_deployed(records: Sequence[Dict[str, Any]], out_dir, preset: Preset, *,
                  log: Callable[[str], None] = print) -> Dict[Tuple, Dict[str, Any]]:
    """The exclusive timing phase: every deployed model of the run, interleaved, on this machine.

    Runs on the driver when no cell is training. For each (dataset, arch) one dense baseline
    (the dense reference's weights) is timed in every round, deployed like the sparse models
    (BatchNorm folded, ReLU fused: the speedup is what the sparsity buys) and as eager torch
    (``speedup_vs_eager``), next to each cell's deployment model:
    ``apb_sparse.deploy(model, x, layout=<the checkpoint's per-layer layouts>)`` (BatchNorm folded,
    ReLU / residual add fused, TorchScript graph), the same form as the dense baseline
    ``deploy(dense, x, layout="dense")``. Each round calls every model for ``preset.latency_min_time``
    seconds; ``preset.latency_rounds`` rounds. The speedup of a cell is the folded dense median over
    its median; its spread is the interquartile range (and min / max) of the per-round ratios
    (dense and sparse from the same round).

    Returns:
        cell key -> ``{"cpu": {...}}`` (and ``"cuda"`` when a GPU is present), to be stored as the
        records' ``latency``.
    """
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
            deployed = deploy(dz, x, layout=cfg.get("paths") or "auto")
            with torch.inference_mode():
                ref, got = dz(x), deployed(x)
            diff = float((got - ref).abs().max())
            cid = cell_id(cell_key(r))
            checks[cid] = {"max_abs_diff": diff, "outputs_match": diff <= 1e-3 * max(1.0, float(ref.abs().max())),
                           "paths": {n: c.layout for n, c in getattr(deployed, "apb_sparse_choices", {}).items()}}
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
                bf = deploy(base.to(dev), xs[da], layout="dense")
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
