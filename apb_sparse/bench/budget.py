"""The optimisation budget of a model: learning-rate sums and per-phase totals."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, Optional, Sequence

import torch

from ..train import _make_scheduler


# ----------------------------------------------------------------------------------- budgets
def lr_sum(lr: float, steps: int, scheduler: Optional[str], schedule_steps: Optional[int] = None) -> float:
    """Sum of the learning rates of the first ``steps`` optimiser steps of train.py's
    ``scheduler`` (cosine, step decay, or constant) planned over ``schedule_steps`` (default:
    ``steps``; more when a phase stopped early), computed with the same torch scheduler."""
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
