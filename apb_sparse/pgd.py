"""Projected gradient descent (Linf / L2, random start, restarts) and the argument checks and
model-state helpers every attack of :mod:`apb_sparse.robustness` shares.  The adversarial-training
loops in :mod:`apb_sparse.train` use :func:`pgd` too."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["pgd", "NORMS"]

NORMS = ("Linf", "L2")


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


def _predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    out = [model(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)
