"""Everything measured on one model of a cell: robustness (AutoAttack standard or the quick
subset, FMN min-norm with masking checks), sparse/dense agreement, sizes (:func:`evaluate_model`)."""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import densify, sparsify, sparsity_report
from ..robustness import _eval_mode, _frozen, _lp_norm, evaluate
from .checkpoint import state_dict_bytes
from .latency import measure_latency
from .presets import Preset


# ----------------------------------------------------------------------------------- attacks
@contextlib.contextmanager
def _quiet_autoattack():
    logger = logging.getLogger("auto-attack")
    old = logger.propagate
    logger.propagate = False
    try:
        yield
    finally:
        logger.propagate = old


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
    from pyautoattack import AutoAttack  # optional ('bench' extra): imported on use

    t0 = time.perf_counter()
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    n = x.shape[0]
    n_targets = max(1, min(int(n_targets), int(model(x[:1]).shape[1]) - 1)) if n else 1
    with _eval_mode(model), _frozen(model), _quiet_autoattack():
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
                inside = (_lp_norm(x_adv - x[idx], norm) <= eps * (1 + 1e-4) + 1e-6) & \
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
    from tqdm.auto import tqdm  # optional ('bench' extra): imported on use

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
    paths = {name: c.layout for name, c in getattr(sparse_model, "apb_sparse_choices", {}).items()}
    out: Dict[str, Any] = {
        "measured_sparsity": report.sparsity, "nonzeros": report.nonzeros, "numel": report.numel,
        "dense_macs": report.dense_macs, "sparse_macs": report.sparse_macs,
        "layers": [{"name": l.name, "path": l.layout, "shape": l.shape, "sparsity": l.sparsity} for l in report.layers],
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
