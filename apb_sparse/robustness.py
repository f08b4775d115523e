"""Attacks and robustness evaluation.

* :func:`pgd` -- projected gradient descent (Linf / L2) with random start and restarts; the
  adversarial-training loops in :mod:`apb_sparse.train` use it too.
* :func:`evaluate` -- clean and robust accuracy of a model under PGD, AutoAttack (the
  ``pyautoattack`` package, i.e. the original authors' code) or the FMN minimum-norm attack (the
  ``secml-torch`` package), with per-sample minimal distances, a security curve and cheap
  gradient-masking checks reported with every result.

Models take [0, 1] images (normalisation lives inside the model); every attack clips to [0, 1].
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["pgd", "evaluate", "RobustnessResult", "MaskingCheck", "fmn_distances",
           "security_curve", "plot_security_curve", "AUTOATTACK_ATTACKS", "NORMS"]

NORMS = ("Linf", "L2")
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
_SINGLE_ATTACKS = ("pgd", "autoattack", "fmn") + AUTOATTACK_ATTACKS


# ----------------------------------------------------------------------------- argument checks
def _check_norm(norm: Any) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def _check_eps(eps: Any, name: str = "eps") -> float:
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(eps).__name__}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {eps!r}")
    return value


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Evaluate in eval mode (BN running stats, no dropout) and restore the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Stop third-party attacks that call ``loss.backward()`` from filling parameter ``.grad``."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)


# ----------------------------------------------------------------------------- PGD
def _lp_norm(t: Tensor, norm: str) -> Tensor:
    flat = t.flatten(1)
    return flat.abs().amax(1) if norm == "Linf" else flat.norm(p=2, dim=1)


def _project(delta: Tensor, norm: str, eps: float) -> Tensor:
    if norm == "Linf":
        return delta.clamp(-eps, eps)
    n = _lp_norm(delta, "L2").clamp_min(1e-12)
    factor = (eps / n).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def _random_start(x: Tensor, norm: str, eps: float) -> Tensor:
    if norm == "Linf":
        return torch.empty_like(x).uniform_(-eps, eps)
    # Uniform direction, radius uniform in [0, eps].
    d = torch.randn_like(x)
    d = d / _lp_norm(d, "L2").clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    r = torch.rand(x.shape[0], device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return d * r * eps


def pgd(model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "Linf", eps: float,
        alpha: Optional[float] = None, steps: int = 10, restarts: int = 1,
        random_start: bool = True, keep_best: bool = True) -> Tensor:
    """Projected gradient ascent on the cross-entropy (Madry et al.), Linf or L2.

    The model is used as it is (its train/eval mode is not changed: :func:`evaluate` and
    :func:`apb_sparse.train.train` put it in eval mode). Only the input gradient is computed
    (``torch.autograd.grad``), so parameter ``.grad`` fields are left untouched.

    Args:
        model: classifier taking [0, 1] images.
        x: clean images ``[N, C, H, W]`` in [0, 1].
        y: labels ``[N]``.
        norm: "Linf" or "L2".
        eps: radius of the threat model (>= 0).
        alpha: step size; default ``2.5 * eps / steps``. Linf steps along the gradient sign,
            L2 along the L2-normalised gradient.
        steps: iterations per restart (>= 1).
        restarts: independent random starts; per sample the worst case is kept (a misclassified
            point if any restart finds one, else the one with the highest loss).
        random_start: start from a uniform point of the ball (else from ``x``).
        keep_best: also keep any misclassified intermediate iterate (evaluation); the training
            loops pass False and use the final iterate, as in Madry's PGD-AT.

    Random starts draw from torch's global generator: seed with ``torch.manual_seed``.

    Returns:
        Adversarial images, same shape as ``x``, within the ball and in [0, 1], detached.
    """
    _check_norm(norm)
    eps = _check_eps(eps)
    steps = _check_positive_int(steps, "steps")
    restarts = _check_positive_int(restarts, "restarts")
    if alpha is None:
        alpha = 2.5 * eps / steps
    alpha = _check_eps(alpha, "alpha")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    x = x.detach()
    y = y.detach()
    if eps == 0 or x.shape[0] == 0:
        return x.clone()

    best = x.clone()
    best_loss = torch.full((x.shape[0],), -float("inf"), device=x.device)
    best_fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    view = (-1,) + (1,) * (x.dim() - 1)

    for _ in range(restarts):
        delta = _random_start(x, norm, eps) if random_start else torch.zeros_like(x)
        delta = ((x + delta).clamp(0, 1) - x).detach()
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            loss = F.cross_entropy(logits, y, reduction="none")
            grad, = torch.autograd.grad(loss.sum(), delta)
            with torch.no_grad():
                if keep_best:
                    fooled = logits.argmax(1) != y
                    new = fooled & ~best_fooled
                    best[new] = (x + delta)[new]
                    best_fooled |= new
                if norm == "Linf":
                    step = alpha * grad.sign()
                else:
                    step = alpha * grad / _lp_norm(grad, "L2").clamp_min(1e-12).view(view)
                delta = _project(delta + step, norm, eps)
                delta = (x + delta).clamp(0, 1) - x
            delta = delta.detach()
        with torch.no_grad():
            x_adv = x + delta
            logits = model(x_adv)
            loss = F.cross_entropy(logits, y, reduction="none")
            fooled = logits.argmax(1) != y
            # Replace where this restart fools a not-yet-fooled sample, or raises its loss.
            take = (fooled & ~best_fooled) | (~best_fooled & ~fooled & (loss > best_loss))
            best[take] = x_adv[take]
            best_loss = torch.where(take, loss, best_loss)
            best_fooled |= fooled
    return best.detach()


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


# ----------------------------------------------------------------------------- FMN
def fmn_distances(model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "Linf", steps: int = 100,
                  step_size: Optional[float] = None, batch_size: int = 256,
                  seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Per-sample minimal adversarial perturbation norms with FMN (Pintor et al., NeurIPS'21).

    Uses the native FMN of ``secml-torch`` (``secmlt.adv.evasion.fmn.FMN``). Every returned
    distance is re-verified here: the adversarial point is re-classified by ``model`` and its norm
    recomputed, so a distance is never smaller than a perturbation that really fools the model.

    Args:
        model: classifier in the mode it should be attacked in (evaluate() uses eval mode).
        x, y: images in [0, 1] and labels.
        norm: "Linf" or "L2".
        steps: FMN iterations.
        step_size: initial step size along the L2-normalised gradient (cosine-annealed to 1/100
            of it); default 1.0 for L2 and 0.1 for Linf, for [0, 1] images.
        batch_size: attack batch size.
        seed: seeds torch before the attack.

    Returns:
        ``(distances, x_adv)``: distances ``[N]`` (0 for clean errors, inf where FMN found no
        adversarial example) and the adversarial images (``x`` where none was found).
    """
    _check_norm(norm)
    steps = _check_positive_int(steps, "steps")
    from secmlt.adv.evasion.fmn import FMN
    from torch.utils.data import DataLoader, TensorDataset

    if step_size is None:
        step_size = 1.0 if norm == "L2" else 0.1
    torch.manual_seed(seed)
    device = _model_device(model)
    attacked = model
    if device.type != "cpu":
        # secml-torch 1.5's native FMN keeps its per-sample bookkeeping on the CPU and mixes it
        # with the model's outputs, which fails for CUDA models: attack a CPU copy instead (the
        # distances are re-verified on the original model below).
        attacked = copy.deepcopy(model).cpu()
    xc, yc = x.detach().cpu(), y.detach().cpu()
    chunks = []
    with _frozen(attacked):
        for i in range(0, xc.shape[0], batch_size):
            # A fresh attack object per batch: secml-torch 1.5 leaves the last batch's per-sample
            # radii in the attack's constraint, which breaks the next batch of another size.
            attack = FMN(perturbation_model="linf" if norm == "Linf" else "l2", num_steps=steps,
                         step_size=float(step_size), backend="native")
            loader = DataLoader(TensorDataset(xc[i:i + batch_size], yc[i:i + batch_size]),
                                batch_size=batch_size)
            chunks += [b for b, _ in attack(attacked, loader)]
    x_adv = torch.cat(chunks).to(device)
    x = x.to(device)
    y = y.to(device)
    with torch.no_grad():
        pred_adv = _predict(model, x_adv, batch_size)
        pred_clean = _predict(model, x, batch_size)
    dist = _lp_norm(x_adv - x, norm)
    dist = torch.where(pred_adv != y, dist, torch.full_like(dist, float("inf")))
    dist = torch.where(pred_clean != y, torch.zeros_like(dist), dist)
    x_adv = torch.where((pred_adv != y).view(-1, *([1] * (x.dim() - 1))), x_adv, x)
    return dist.detach().cpu(), x_adv.detach()


def security_curve(distances: Tensor, eps_grid: Sequence[float]) -> Tuple[List[float], List[float]]:
    """Robust accuracy at each eps of ``eps_grid``: the fraction of samples whose minimal
    adversarial distance exceeds eps (clean errors have distance 0 and never count)."""
    d = distances.detach().cpu().double()
    grid = [float(e) for e in eps_grid]
    return grid, [float((d > e).double().mean()) for e in grid]


def plot_security_curve(curves: Dict[str, Tuple[Sequence[float], Sequence[float]]],
                        path: Union[str, Path], *, norm: str = "Linf",
                        eps_marker: Optional[float] = None, title: Optional[str] = None) -> Path:
    """Plot one or more security curves (robust accuracy vs eps) to a PNG file.

    Args:
        curves: label -> (eps_grid, robust_accuracy).
        path: output file (parent folders are created).
        norm: for the x-axis label.
        eps_marker: draw a vertical line at this eps (the evaluated radius).
        title: figure title.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for label, (grid, acc) in curves.items():
        ax.plot(list(grid), [100 * a for a in acc], label=label)
    if eps_marker is not None:
        ax.axvline(eps_marker, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel(f"{norm} eps")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- helpers
def _predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    out = [model(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


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
