"""Minimum-norm attack (FMN, from ``secml-torch``) and security curves: robust accuracy as a
function of the perturbation budget, from per-sample minimal distances."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .pgd import _check_norm, _check_positive_int, _frozen, _lp_norm, _model_device, _predict

__all__ = ["fmn_distances", "security_curve", "plot_security_curve"]


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


