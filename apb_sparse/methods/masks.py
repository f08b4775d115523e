"""Mask math of the pruning methods: scores in, exact 0/1 masks out.

Per-layer and global top-k over weights or whole filters, the straight-through top-k of score
learning (with its sort cache), and installing / measuring masks on masked layers.

**Exact sparsity.** Local budgets are rounded with the largest-remainder rule so that the total
number of kept weights is exactly ``round((1 - sparsity) * N)``; global budgets select exactly that
many. Ties are broken deterministically (stable sort: lower flat index wins). Every layer keeps at
least ``min_keep`` (default 1) weights / filters, so a global criterion can never disconnect the
network; this can move a layer's budget, never the total.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "largest_remainder", "topk_mask", "local_masks", "global_masks", "unit_masks_local",
    "unit_masks_global", "filter_norms", "expand_filter_mask", "magnitude_scores", "install_masks",
    "apply_masks", "measured_sparsity", "ste_topk", "topk_mask_cached", "cached_ste_topk",
]

# ----------------------------------------------------------------------------------- exact top-k

def largest_remainder(quotas: Sequence[float], total: int, lo: Sequence[int], hi: Sequence[int]) -> List[int]:
    """Integers ``k_i`` in ``[lo_i, hi_i]`` summing to ``total``, as close as possible to ``quotas``.

    Floors the quotas, then hands out the rest by largest fractional part (ties: lower index).
    Used to turn per-layer real budgets into exact integer counts.
    """
    n = len(quotas)
    if sum(lo) > total or sum(hi) < total:
        raise ValueError(f"cannot keep {total} units with per-layer bounds {list(lo)}..{list(hi)}")
    q = [min(max(float(quotas[i]), lo[i]), hi[i]) for i in range(n)]
    k = [int(math.floor(v)) for v in q]
    k = [min(max(k[i], lo[i]), hi[i]) for i in range(n)]
    diff = total - sum(k)
    order = sorted(range(n), key=lambda i: (-(q[i] - math.floor(q[i])), i))
    # Round-robin by remainder, then by room left; bounded loops since sum(lo) <= total <= sum(hi).
    while diff != 0:
        changed = False
        for i in order:
            if diff > 0 and k[i] < hi[i]:
                k[i] += 1
                diff -= 1
                changed = True
            elif diff < 0 and k[i] > lo[i]:
                k[i] -= 1
                diff += 1
                changed = True
            if diff == 0:
                break
        if not changed:  # pragma: no cover - excluded by the bounds check
            raise RuntimeError("largest_remainder did not converge")
    return k


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """0/1 mask (scores' shape and dtype float) keeping the ``k`` largest scores.

    Ties are broken by position (lower flat index first) via a stable sort, so equal scores give
    the same mask on every run and device.
    """
    flat = scores.detach().flatten()
    k = int(max(0, min(k, flat.numel())))
    mask = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
    if k > 0:
        idx = torch.sort(flat.float(), descending=True, stable=True).indices[:k]
        mask[idx] = 1.0
    return mask.view_as(scores)


def local_masks(scores: Sequence[Tensor], sparsity: float, *, min_keep: int = 1) -> List[Tensor]:
    """Per-layer top-k masks: every layer keeps ~``1 - sparsity`` of its entries, the total exactly."""
    sizes = [s.numel() for s in scores]
    total = int(round((1.0 - sparsity) * sum(sizes)))
    lo = [min(min_keep, n) for n in sizes]
    total = max(total, sum(lo))
    keep = largest_remainder([(1.0 - sparsity) * n for n in sizes], total, lo, sizes)
    return [topk_mask(s, k) for s, k in zip(scores, keep)]


def global_masks(scores: Sequence[Tensor], sparsity: float, *, min_keep: int = 1,
                 weights: Optional[Sequence[Tensor]] = None) -> List[Tensor]:
    """One global top-k over all layers' scores; exactly ``round((1 - sparsity) * N)`` kept.

    Each layer first keeps its ``min_keep`` best entries (so no layer is cut off); the remaining
    budget goes to the globally best of the rest. ``weights`` (optional, shaped like ``scores``)
    gives the number of weights each score stands for (filters): then the budget is counted in
    weights and filled greedily, exact within one unit.
    """
    if weights is not None:
        return unit_masks_global(scores, weights, sparsity, min_keep=min_keep)
    sizes = [s.numel() for s in scores]
    total = max(int(round((1.0 - sparsity) * sum(sizes))), sum(min(min_keep, n) for n in sizes))
    forced = [topk_mask(s, min(min_keep, s.numel())).bool() for s in scores]
    # Forced entries score +inf so the single global top-k takes them first.
    flat = torch.cat([torch.where(f, torch.full_like(s.detach().float(), math.inf), s.detach().float()).flatten()
                      for s, f in zip(scores, forced)])
    chosen = topk_mask(flat, total)
    out, start = [], 0
    for s in scores:
        out.append(chosen[start:start + s.numel()].view_as(s))
        start += s.numel()
    return out


def unit_masks_local(unit_scores: Sequence[Tensor], unit_sizes: Sequence[int], sparsity: float,
                     *, min_keep: int = 1) -> List[Tensor]:
    """Per-layer top-k over units (filters): each layer keeps ~``1 - sparsity`` of its units.

    The kept-unit counts are balanced with the largest-remainder rule on *weights*, so the total
    kept weights is as close to ``(1 - sparsity) * N`` as whole filters allow.
    """
    counts = [s.numel() for s in unit_scores]
    sizes = [int(z) for z in unit_sizes]
    n_weights = sum(c * z for c, z in zip(counts, sizes))
    target = (1.0 - sparsity) * n_weights
    lo = [min(min_keep, c) for c in counts]
    # Integer units per layer: start from the per-layer share, then fix the weight total greedily.
    keep = [min(max(int(round((1.0 - sparsity) * c)), lo[i]), counts[i]) for i, c in enumerate(counts)]
    kept_w = sum(k * z for k, z in zip(keep, sizes))
    improved = True
    while improved:
        improved = False
        best = None
        for i in range(len(counts)):
            for d in (-1, 1):
                if lo[i] <= keep[i] + d <= counts[i]:
                    err = abs(kept_w + d * sizes[i] - target)
                    if err < abs(kept_w - target) - 1e-9 and (best is None or err < best[0]):
                        best = (err, i, d)
        if best is not None:
            _, i, d = best
            keep[i] += d
            kept_w += d * sizes[i]
            improved = True
    return [topk_mask(s, k) for s, k in zip(unit_scores, keep)]


def unit_masks_global(unit_scores: Sequence[Tensor], unit_sizes: Sequence, sparsity: float,
                      *, min_keep: int = 1) -> List[Tensor]:
    """Global top units (filters) until ``(1 - sparsity)`` of the weights are kept.

    ``unit_sizes[i]`` is an int (every unit of layer i has that many weights) or a tensor shaped
    like ``unit_scores[i]``. Units are taken in descending score order (ties: layer order, then
    index) while they fit the budget; at least ``min_keep`` units per layer.
    """
    sizes = [torch.full(s.shape, int(z), dtype=torch.float64) if not isinstance(z, Tensor)
             else z.detach().double().cpu() for s, z in zip(unit_scores, unit_sizes)]
    n_weights = float(sum(z.sum() for z in sizes))
    budget = (1.0 - sparsity) * n_weights
    masks = [topk_mask(s, min(min_keep, s.numel())).cpu() for s in unit_scores]
    used = float(sum((m.double() * z).sum() for m, z in zip(masks, sizes)))
    flat_s = torch.cat([torch.where(m.bool(), torch.full_like(s.detach().float().cpu(), -math.inf),
                                    s.detach().float().cpu()).flatten() for s, m in zip(unit_scores, masks)])
    flat_z = torch.cat([z.flatten() for z in sizes])
    layer_of = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(unit_scores)])
    offsets = [0]
    for s in unit_scores:
        offsets.append(offsets[-1] + s.numel())
    order = torch.sort(flat_s, descending=True, stable=True).indices.tolist()
    for j in order:
        if not math.isfinite(float(flat_s[j])):
            break
        z = float(flat_z[j])
        if abs(used + z - budget) <= abs(used - budget) and used < budget:
            i = int(layer_of[j])
            masks[i].view(-1)[j - offsets[i]] = 1.0
            used += z
    return [m.to(s.device) for m, s in zip(masks, unit_scores)]


def filter_norms(layer: nn.Module, p: int = 2) -> Tensor:
    """Lp norm of every output filter of a conv/linear weight (shape ``[out]``)."""
    return layer.weight.detach().flatten(1).norm(p=p, dim=1)


def expand_filter_mask(layer: nn.Module, filter_mask: Tensor) -> Tensor:
    """Broadcast a per-filter 0/1 vector to the layer's weight shape."""
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    return filter_mask.to(layer.weight.dtype).view(shape).expand_as(layer.weight).contiguous()


def magnitude_scores(layers: Iterable[nn.Module]) -> List[Tensor]:
    """|weight * current mask| of each layer (already-pruned weights score 0)."""
    return [(l.weight.detach() * l.weight_mask).abs() for l in layers]


@torch.no_grad()
def install_masks(layers: Sequence[nn.Module], masks: Sequence[Tensor]) -> None:
    """Install final masks on masked layers (removing any ``mask_fn``) and zero the pruned weights.

    (Not :func:`apb_sparse.apply_masks`, which applies ``{name: mask}`` to a model's layers.)"""
    for layer, mask in zip(layers, masks):
        layer.mask_fn = None
        layer.set_mask(mask.to(device=layer.weight.device, dtype=layer.weight.dtype))


def apply_masks(layers: Sequence[nn.Module], masks: Sequence[Tensor]) -> None:
    """Deprecated name of :func:`install_masks` (one ``apply_masks`` in the package: the model one)."""
    warnings.warn("apb_sparse.methods.base.apply_masks is renamed install_masks", DeprecationWarning, stacklevel=2)
    install_masks(layers, masks)


def measured_sparsity(layers: Iterable[nn.Module]) -> float:
    """Fraction of zeros in ``weight_mask`` over the given layers."""
    zeros = total = 0
    for l in layers:
        total += l.weight_mask.numel()
        zeros += l.weight_mask.numel() - int(l.weight_mask.count_nonzero())
    return zeros / max(1, total)


# ----------------------------------------------------------------------------------- scores

class _STETopK(torch.autograd.Function):
    """Hard top-k mask forward, identity gradient backward (edge-popup / HYDRA)."""

    @staticmethod
    def forward(ctx, scores: Tensor, k: int):
        return topk_mask(scores, k).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def ste_topk(scores: Tensor, k: int) -> Tensor:
    """Top-``k`` 0/1 mask of ``scores`` whose gradient flows straight through to ``scores``."""
    return _STETopK.apply(scores, int(k))


def topk_mask_cached(cache: Dict[str, Any], scores: Tensor, k: int) -> Tensor:
    """``topk_mask(|scores|, k)`` (in ``scores``' dtype), recomputed only when the values or ``k`` changed.

    ``cache`` is a dict owned by the caller (one per scores tensor). Change is detected by comparing
    ``scores`` with a snapshot taken when the mask was computed (one elementwise pass, cheaper than
    the sort), never by the tensor's version counter: fused optimisers
    (``torch.optim.SGD(fused=True)``, ``Adam(fused=True)``) and ``.data`` writes update a tensor
    without bumping ``_version``, and a version-keyed cache would then silently freeze the mask.
    """
    s = scores.detach()
    snap = cache.get("snapshot")
    fresh = (snap is not None and cache.get("k") == k and snap.shape == s.shape
             and snap.dtype == s.dtype and snap.device == s.device and torch.equal(snap, s))
    if not fresh:
        cache["mask"] = topk_mask(s.abs(), k).to(s.dtype)
        cache["snapshot"] = s.clone()
        cache["k"] = k
    return cache["mask"]


def cached_ste_topk(scores: Tensor, k_fn: Callable[[], int]) -> Callable[[nn.Module], Tensor]:
    """A ``mask_fn`` for ``scores``: straight-through top-k of ``|scores|``, recomputed lazily.

    The sort only reruns when the values of ``scores`` or the budget ``k_fn()`` changed (see
    :func:`topk_mask_cached`), so the many forwards of a PGD attack reuse one mask, and a score
    update by any path (plain, foreach or fused optimiser, ``.data`` write) moves the mask. The
    returned tensor equals the 0/1 mask exactly and its gradient reaches ``scores`` as
    ``d|s|/ds * grad`` (HYDRA / edge-popup's straight-through estimator).
    """
    cache: Dict[str, Any] = {}

    def mask_fn(_layer: nn.Module) -> Tensor:
        mask = topk_mask_cached(cache, scores, int(k_fn()))
        a = scores.abs()
        return mask + (a - a.detach())
    return mask_fn
