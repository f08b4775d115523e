"""Robustness evaluation (one entry point, :func:`evaluate`) and its result records.

The attacks live in :mod:`apb_sparse.pgd` (PGD) and :mod:`apb_sparse.security` (FMN minimum-norm
distances, security curves); their names are re-exported here.

* :func:`pgd` -- projected gradient descent (Linf / L2) with random start and restarts; the
  adversarial-training loops in :mod:`apb_sparse.train` use it too.
* :func:`evaluate` -- clean and robust accuracy of a model under PGD, AutoAttack (the
  ``pyautoattack`` package, i.e. the original authors' code) or the FMN minimum-norm attack (the
  ``secml-torch`` package), with per-sample minimal distances, a security curve and cheap
  gradient-masking checks reported with every result.

Models take [0, 1] images (normalisation lives inside the model); every attack clips to [0, 1].
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .pgd import (NORMS, _check_eps, _check_norm, _check_positive_int, _eval_mode, _frozen, _lp_norm,  # noqa: F401
                  _model_device, _predict, _project, _random_start, pgd)
from .security import fmn_distances, plot_security_curve, security_curve

__all__ = ["pgd", "evaluate", "RobustnessResult", "MaskingCheck", "fmn_distances",
           "security_curve", "plot_security_curve", "AUTOATTACK_ATTACKS", "NORMS"]

AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
_SINGLE_ATTACKS = ("pgd", "autoattack", "fmn") + AUTOATTACK_ATTACKS



# ----------------------------------------------------------------------------- results
@dataclass
class MaskingCheck:
    """One gradient-masking sanity check.

    Attributes:
        name: "eps_monotone", "large_eps_breaks", "more_steps_not_weaker" or
            "black_box_not_stronger".
        passed: False when the evaluation looks like gradient masking on this check.
        detail: the numbers the verdict rests on.
    """

    name: str
    passed: bool
    detail: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RobustnessResult:
    """Outcome of :func:`evaluate`.

    Attributes:
        attack: attack description ("autoattack", "pgd", "fmn", "custom:apgd-ce,square", ...).
        norm, eps: threat model.
        n_samples: number of evaluated samples.
        clean_accuracy, robust_accuracy: fractions in [0, 1].
        per_attack: robust accuracy after each attack in order (AutoAttack style: cumulative),
            starting with "clean".
        correct: per-sample clean correctness (bool, CPU).
        robust: per-sample robustness under the attack (bool, CPU).
        distances: per-sample minimal perturbation norms found by FMN (inf where no adversarial
            example was found, 0 for clean errors); None when FMN was not run.
        security_curve: ``(eps_grid, robust_accuracy)`` from ``distances``; None without FMN.
        wall_time: seconds for the whole call (checks included); ``attack_time`` without checks.
        checks: gradient-masking checks (empty when disabled).
        masking_suspected: True when any check failed.
        seed: the seed used.
        plot_path: where the security-curve PNG was written, if requested.
    """

    attack: str
    norm: str
    eps: float
    n_samples: int
    clean_accuracy: float
    robust_accuracy: float
    per_attack: Dict[str, float]
    correct: Tensor
    robust: Tensor
    distances: Optional[Tensor] = None
    security_curve: Optional[Tuple[List[float], List[float]]] = None
    wall_time: float = 0.0
    attack_time: float = 0.0
    checks: List[MaskingCheck] = field(default_factory=list)
    masking_suspected: bool = False
    seed: int = 0
    plot_path: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly summary (per-sample tensors become lists)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("correct", "robust", "distances", "checks")}
        d["checks"] = [asdict(c) for c in self.checks]
        if self.distances is not None:
            d["distances"] = [float(v) for v in self.distances.tolist()]
        return d

    def summary(self) -> str:
        flag = "  MASKING SUSPECTED" if self.masking_suspected else ""
        return (f"{self.attack} {self.norm} eps={self.eps:.4g} n={self.n_samples}: clean "
                f"{100 * self.clean_accuracy:.2f}% robust {100 * self.robust_accuracy:.2f}% "
                f"({self.attack_time:.1f} s){flag}")



# ----------------------------------------------------------------------------- helpers
def _pgd_robust(model, x, y, *, norm, eps, steps, restarts, alpha, batch_size, seed) -> Tensor:
    torch.manual_seed(seed)
    flags = []
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        xa = pgd(model, xb, yb, norm=norm, eps=eps, alpha=alpha, steps=steps, restarts=restarts)
        with torch.no_grad():
            flags.append(model(xa).argmax(1) == yb)
    return torch.cat(flags)


def _resolve_data(data, n_samples: Optional[int]) -> Tuple[Tensor, Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"data: x has {x.shape[0]} samples but y has {y.shape[0]}")
        if n_samples is not None:
            x, y = x[:n_samples], y[:n_samples]
        return x, y.long()
    if hasattr(data, "tensors") and hasattr(data, "test"):
        return data.tensors("test", n_samples)
    raise TypeError("data must be a DatasetBundle (its test split is used) or an (x, y) tensor pair, "
                    f"got {type(data).__name__}")


def _large_eps(norm: str, x: Tensor) -> float:
    # Both balls contain the constant 0.5 image of every [0, 1] input, so at this radius the true
    # robust accuracy is at most the share of the class predicted on that image: a sound attack
    # must get close to it.
    return 0.5 if norm == "Linf" else 0.5 * math.sqrt(x[0].numel())


class _AALogCapture(logging.Handler):
    """Collect pyautoattack's 'robust accuracy after X: Y%' lines for the per-attack breakdown."""

    pattern = re.compile(r"robust accuracy after ([A-Z0-9-]+): ([0-9.]+)%")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.per_attack: Dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        m = self.pattern.search(record.getMessage())
        if m:
            self.per_attack[m.group(1).lower()] = float(m.group(2)) / 100


def _run_autoattack(model, x, y, *, norm, eps, version, attacks, batch_size, seed, device, verbose):
    from pyautoattack import AutoAttack

    adversary = AutoAttack(model, norm=norm, eps=eps, version=version, attacks=attacks,
                           device=device, seed=seed)
    logger = logging.getLogger("auto-attack")
    capture = _AALogCapture()
    old_level, old_prop = logger.level, logger.propagate
    logger.addHandler(capture)
    logger.setLevel(logging.DEBUG)
    if not verbose:
        logger.propagate = False
    try:
        x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)
        logger.propagate = old_prop
    return x_adv, y_adv, capture.per_attack


# ----------------------------------------------------------------------------- evaluate
def evaluate(model: nn.Module, data, *, attack: Union[str, Sequence[str]] = "autoattack",
             norm: str = "Linf", eps: float = 8 / 255, n_samples: Optional[int] = 1000,
             batch_size: int = 250, seed: int = 0, version: str = "standard",
             pgd_steps: int = 50, pgd_restarts: int = 1, pgd_alpha: Optional[float] = None,
             min_norm: bool = False, fmn_steps: int = 100, fmn_step_size: Optional[float] = None,
             eps_grid: Optional[Sequence[float]] = None, plot: Union[str, Path, None] = None,
             checks: bool = True, check_samples: int = 64, check_tol: float = 0.05,
             square_queries: int = 500, verbose: bool = False) -> RobustnessResult:
    """Clean and robust accuracy of ``model`` under an attack, with gradient-masking checks.

    The model is evaluated in eval mode (its mode is restored afterwards) on its own device.

    Args:
        model: classifier taking [0, 1] images.
        data: a :class:`~apb_sparse.data.DatasetBundle` (its test split, first ``n_samples``) or
            an ``(x, y)`` tensor pair.
        attack: "autoattack" (pyautoattack, ``version``), "pgd", "fmn" (minimum-norm; the robust
            accuracy at ``eps`` is read from the distances), one AutoAttack attack name
            ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square"), or a list of those
            names (AutoAttack version "custom", run in the given order).
        norm: "Linf" or "L2".
        eps: radius (>= 0).
        n_samples: evaluate the first ``n_samples`` (> 0; None = all).
        batch_size: attack batch size (also AutoAttack's ``batch_size``).
        seed: seeds PGD / FMN and is AutoAttack's ``seed``.
        version: AutoAttack version for ``attack="autoattack"`` ("standard", "plus", "rand").
        pgd_steps, pgd_restarts, pgd_alpha: PGD settings (``attack="pgd"``).
        min_norm: also run FMN (always done for ``attack="fmn"``) to fill ``distances`` and
            ``security_curve``.
        fmn_steps, fmn_step_size: FMN settings.
        eps_grid: eps values of the security curve (default 50 points over [0, 4 * eps]).
        plot: write the security-curve PNG here (needs FMN distances).
        checks: run the gradient-masking checks (on the first ``check_samples`` samples).
        check_samples: samples used by the checks.
        check_tol: tolerance (accuracy fraction) of the checks.
        square_queries: query budget of the Square attack in the black-box check.
        verbose: let pyautoattack's log through.

    Returns:
        A :class:`RobustnessResult`.

    Raises:
        ValueError: unknown ``attack`` or ``version``, bad ``norm``, ``eps < 0``, non-positive
            ``n_samples`` / ``batch_size`` / step counts.
    """
    t0 = time.perf_counter()
    # --- validate everything before any work
    _check_norm(norm)
    eps = _check_eps(eps)
    if n_samples is not None:
        n_samples = _check_positive_int(n_samples, "n_samples")
    batch_size = _check_positive_int(batch_size, "batch_size")
    pgd_steps = _check_positive_int(pgd_steps, "pgd_steps")
    pgd_restarts = _check_positive_int(pgd_restarts, "pgd_restarts")
    fmn_steps = _check_positive_int(fmn_steps, "fmn_steps")
    check_samples = _check_positive_int(check_samples, "check_samples")
    if isinstance(attack, str):
        if attack not in _SINGLE_ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; expected one of {list(_SINGLE_ATTACKS)} "
                             f"or a list of AutoAttack attack names {list(AUTOATTACK_ATTACKS)}")
        aa_attacks = [attack] if attack in AUTOATTACK_ATTACKS else None
        label = attack
    else:
        aa_attacks = list(attack)
        bad = [a for a in aa_attacks if a not in AUTOATTACK_ATTACKS]
        if not aa_attacks or bad:
            raise ValueError(f"attack: unknown AutoAttack attack name(s) {bad or aa_attacks!r}; "
                             f"expected names from {list(AUTOATTACK_ATTACKS)}")
        label = "custom:" + ",".join(aa_attacks)
    if attack == "autoattack" and version not in ("standard", "plus", "rand"):
        raise ValueError(f"version must be 'standard', 'plus' or 'rand', got {version!r}")
    if eps_grid is not None:
        eps_grid = [_check_eps(e, "eps_grid") for e in eps_grid]
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")

    x, y = _resolve_data(data, n_samples)
    device = _model_device(model)
    x, y = x.to(device), y.to(device)
    n = x.shape[0]
    if n == 0:
        raise ValueError("data holds no samples")

    with _eval_mode(model):
        with torch.no_grad():
            correct = _predict(model, x, batch_size) == y
        per_attack: Dict[str, float] = {"clean": int(correct.sum()) / n}
        distances = None
        t_attack = time.perf_counter()
        if attack == "pgd":
            robust = correct & _pgd_robust(model, x, y, norm=norm, eps=eps, steps=pgd_steps,
                                           restarts=pgd_restarts, alpha=pgd_alpha,
                                           batch_size=batch_size, seed=seed)
            per_attack[f"pgd-{pgd_steps}x{pgd_restarts}"] = int(robust.sum()) / n
        elif attack == "fmn":
            distances, _ = fmn_distances(model, x, y, norm=norm, steps=fmn_steps,
                                         step_size=fmn_step_size, batch_size=batch_size, seed=seed)
            robust = (distances > eps).to(device)
            per_attack["fmn"] = int(robust.sum()) / n
        else:
            aa_version = version if attack == "autoattack" else "custom"
            _, y_adv, breakdown = _run_autoattack(
                model, x, y, norm=norm, eps=eps, version=aa_version,
                attacks=None if attack == "autoattack" else aa_attacks,
                batch_size=batch_size, seed=seed, device=device, verbose=verbose)
            robust = (y_adv == y) & correct
            per_attack.update(breakdown)
        attack_time = time.perf_counter() - t_attack

        if min_norm and distances is None:
            distances, _ = fmn_distances(model, x, y, norm=norm, steps=fmn_steps,
                                         step_size=fmn_step_size, batch_size=batch_size, seed=seed)
        curve = None
        if distances is not None:
            grid = eps_grid if eps_grid is not None else [4 * eps * i / 49 for i in range(50)]
            if eps == 0 and eps_grid is None:
                finite = distances[torch.isfinite(distances)]
                top = float(finite.max()) if finite.numel() else 1.0
                grid = [top * i / 49 for i in range(50)]
            curve = security_curve(distances, grid)

        check_list: List[MaskingCheck] = []
        if checks and eps > 0:
            check_list = _masking_checks(model, x[:check_samples], y[:check_samples],
                                         robust[:check_samples], norm=norm, eps=eps, seed=seed,
                                         tol=check_tol, batch_size=batch_size,
                                         square_queries=square_queries)

    plot_path = None
    if plot is not None:
        if curve is None:
            raise ValueError("plot needs min-norm distances: pass attack='fmn' or min_norm=True")
        plot_path = str(plot_security_curve({label: curve}, plot, norm=norm, eps_marker=eps,
                                            title=f"security curve ({n} samples)"))

    return RobustnessResult(
        attack=label, norm=norm, eps=eps, n_samples=n,
        clean_accuracy=per_attack["clean"], robust_accuracy=int(robust.sum()) / n,
        per_attack=per_attack, correct=correct.cpu(), robust=robust.cpu(), distances=distances,
        security_curve=curve, wall_time=time.perf_counter() - t0, attack_time=attack_time,
        checks=check_list, masking_suspected=any(not c.passed for c in check_list), seed=seed,
        plot_path=plot_path)


def _masking_checks(model, x, y, robust_main, *, norm, eps, seed, tol, batch_size,
                    square_queries) -> List[MaskingCheck]:
    """Cheap sanity checks in the spirit of Carlini et al. 2019 / Croce et al. 2022.

    All run PGD with 10 steps unless stated; accuracies are fractions of the check subset.
    """
    out: List[MaskingCheck] = []
    m = x.shape[0]
    slack = tol + 1.0 / m  # one sample of slack on small subsets

    # 1. robust accuracy does not rise with eps, and a huge eps breaks (almost) everything.
    big = _large_eps(norm, x)
    grid = [eps / 2, eps, 2 * eps, 4 * eps]
    accs = [float(_pgd_robust(model, x, y, norm=norm, eps=e, steps=10, restarts=1, alpha=None,
                              batch_size=batch_size, seed=seed).float().mean()) for e in grid]
    rises = [(grid[i], grid[i + 1]) for i in range(len(grid) - 1) if accs[i + 1] > accs[i] + slack]
    out.append(MaskingCheck("eps_monotone", not rises,
                            {"eps": grid, "pgd_accuracy": accs, "rises": rises}))
    acc_big = float(_pgd_robust(model, x, y, norm=norm, eps=big, steps=20, restarts=1, alpha=None,
                                batch_size=batch_size, seed=seed).float().mean())
    # A model that predicts one class for most inputs (a collapsed pruned model) keeps the images
    # of that class at any eps without any masking: the bar is the share of the model's majority
    # predicted class (plus one sample of slack), not a fixed tolerance.
    with torch.no_grad():
        pred = _predict(model, x, batch_size)
    majority = float(torch.bincount(pred.flatten().cpu()).max()) / m if m else 0.0
    threshold = max(tol, majority + 1.0 / m if m else tol)
    out.append(MaskingCheck("large_eps_breaks", acc_big <= threshold,
                            {"eps": big, "pgd_accuracy": acc_big, "threshold": threshold,
                             "tolerance": tol, "majority_prediction_share": majority}))

    # 2. more steps and restarts are not weaker than few.
    acc_few = float(_pgd_robust(model, x, y, norm=norm, eps=eps, steps=10, restarts=1, alpha=None,
                                batch_size=batch_size, seed=seed).float().mean())
    strong = _pgd_robust(model, x, y, norm=norm, eps=eps, steps=50, restarts=2, alpha=None,
                         batch_size=batch_size, seed=seed + 1)
    acc_many = float(strong.float().mean())
    out.append(MaskingCheck("more_steps_not_weaker", acc_many <= acc_few + slack,
                            {"pgd10x1": acc_few, "pgd50x2": acc_many}))

    # 3. the black-box Square attack does not beat the white-box attacks.
    from pyautoattack.square import SquareAttack

    sq = SquareAttack(model, p_init=0.8, n_queries=square_queries, eps=eps, norm=norm,
                      n_restarts=1, seed=seed, verbose=False, device=x.device, resc_schedule=False)
    with torch.no_grad():
        sq_flags = []
        for i in range(0, m, batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            sq_flags.append(model(sq.perturb(xb, yb)).argmax(1) == yb)
        acc_sq = float(torch.cat(sq_flags).float().mean())
    white = robust_main.to(strong.device) & strong
    acc_white = float(white.float().mean())
    out.append(MaskingCheck("black_box_not_stronger", acc_sq >= acc_white - slack,
                            {"square": acc_sq, "white_box": acc_white, "queries": square_queries}))
    return out
