"""Shared machinery of the pruning methods: recipe, taxonomy tags, base class, registry, mask helpers.

A pruning method turns a model into one whose ``MaskedConv2d`` / ``MaskedLinear`` layers carry final
0/1 masks, with pruned weights exactly zero. It never calls a kernel: the conversion to sparse
layers (``apb_sparse.sparsify``) and the benchmark take it from there.

**Prunable weights (one rule for every method).**

* ``structure="unstructured"``: the weights of every conv and every linear layer of the model,
  first conv and classifier included (HYDRA's choice). The requested sparsity is the fraction of
  zeros over all of them, so it matches the total of ``apb_sparse.sparsity_report``. Biases,
  BatchNorm parameters and the embedded normalisation are not pruned.
* ``structure="filter"`` (aliases ``"structured"``, ``"channel"``): whole output filters of every
  conv layer (``groups == 1``). Linear layers stay dense because a row of the classifier is a class.
  The requested sparsity is the fraction of conv weights removed by pruned filters (within one
  filter per layer of rounding). For a pruned filter the conv's mask row, its bias and the
  following BatchNorm channel (weight and bias) are zero and are kept zero during training, so
  ``apb_sparse.compact`` can remove the channel; compact also drops the matching input channels of
  the consumers, so the compacted model is smaller than the filter sparsity alone says. Filters
  feeding a residual addition are only removed by compact if the whole group is pruned.

**Exact sparsity.** Local budgets are rounded with the largest-remainder rule so that the total
number of kept weights is exactly ``round((1 - sparsity) * N)``; global budgets select exactly that
many. Ties are broken deterministically (stable sort: lower flat index wins). Every layer keeps at
least ``min_keep`` (default 1) weights / filters, so a global criterion can never disconnect the
network; this can move a layer's budget, never the total.

**Epoch budget.** All methods share one :class:`Recipe`. Its three phase lengths add up to the
budget every method spends:

* pipeline A (prune after training): ``pretrain_epochs`` dense training (skipped when the caller
  says the model is ``pretrained``), ``prune_epochs`` for the pruning phase (score learning, ADMM,
  ...), ``finetune_epochs`` masked finetuning. One-shot criteria that need no training to prune
  (magnitude, random, MAD) spend ``prune_epochs`` finetuning as well.
* pipeline B (prune before training): ``prune_epochs`` of ticket search, then
  ``pretrain_epochs + finetune_epochs`` of training the sparse network (RST: all epochs on scores).
* pipeline D (prune during training): one run of all ``pretrain + prune + finetune`` epochs.

**Fresh models.** ``prune(model=None, ...)`` builds the architecture with
``apb_sparse.models.get_model(recipe.arch, ...)`` under ``recipe.seed``. A given model is deep-copied
(``inplace=False``). Pipeline-A methods use its weights as the dense starting point; pipeline-B/D
methods use them as their *initialisation*, so when the caller passes ``pretrained=True`` they
re-initialise a copy (``reset_parameters`` of every submodule, under ``recipe.seed``) because their
algorithms start from random weights.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
import warnings
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from ..nn.masked import MaskedConv2d, MaskedLayer, MaskedLinear, masked_layers, to_masked

__all__ = [
    "Recipe", "TaxonomyTags", "PruneResult", "PruneContext", "PruningMethod", "register", "get",
    "available", "STRUCTURES", "normalize_structure", "prunable_layers", "largest_remainder",
    "topk_mask", "local_masks", "global_masks", "unit_masks_local", "unit_masks_global",
    "expand_filter_mask", "filter_norms", "magnitude_scores", "install_masks", "apply_masks", "measured_sparsity",
    "following_batchnorms", "zero_pruned_channels_", "ste_topk", "cached_ste_topk",
    "topk_mask_cached", "chain_steps", "reinitialize_",
]

# ----------------------------------------------------------------------------------- recipe

@dataclass
class Recipe:
    """The training recipe every method shares; per-method hyper-parameters sit on the method.

    Attributes:
        arch: architecture name for ``apb_sparse.models.get_model`` (used when no model is given).
        dataset: dataset name for ``apb_sparse.data.get_dataset`` (used when no data is given).
        mode: adversarial-training loss of every AT phase: "pgd", "trades", "fgsm" or "natural".
        norm, eps, alpha, steps: the training attack (``alpha=None``: train.py's default step).
        pretrain_epochs, prune_epochs, finetune_epochs: the phase lengths (see module docstring).
        batch_size: minibatch size.
        lr: learning rate of training from scratch / dense pretraining and of score learning.
        finetune_lr: learning rate of masked finetuning (the papers finetune at ~1/10 of ``lr``).
        weight_decay, momentum, optimizer, scheduler: as in ``train.TrainConfig``.
        trades_beta: TRADES trade-off when ``mode == "trades"``.
        seed: seeds model construction, masks, data order and attacks.
        progress: show train.py's progress bars.
    """

    arch: str = "resnet18"
    dataset: str = "cifar10"
    mode: str = "pgd"
    norm: str = "Linf"
    eps: float = 8 / 255
    alpha: Optional[float] = None
    steps: int = 10
    pretrain_epochs: int = 100
    prune_epochs: int = 20
    finetune_epochs: int = 50
    batch_size: int = 128
    lr: float = 0.1
    finetune_lr: float = 0.01
    weight_decay: float = 5e-4
    momentum: float = 0.9
    optimizer: str = "sgd"
    scheduler: str = "cosine"
    trades_beta: float = 6.0
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        for name in ("pretrain_epochs", "prune_epochs", "finetune_epochs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"Recipe.{name} must be an int >= 0, got {v!r}")
        if self.mode not in ("natural", "pgd", "trades", "fgsm"):
            raise ValueError(f"Recipe.mode must be 'natural', 'pgd', 'trades' or 'fgsm', got {self.mode!r}")
        if self.norm not in ("Linf", "L2"):
            raise ValueError(f"Recipe.norm must be 'Linf' or 'L2', got {self.norm!r}")
        if self.eps < 0:
            raise ValueError(f"Recipe.eps must be >= 0, got {self.eps}")

    @property
    def total_epochs(self) -> int:
        return self.pretrain_epochs + self.prune_epochs + self.finetune_epochs

    def replace(self, **changes) -> "Recipe":
        """A copy with some fields changed."""
        return replace(self, **changes)

    def train_config(self, epochs: int, *, mode: Optional[str] = None, lr: Optional[float] = None,
                     **overrides):
        """The ``train.TrainConfig`` of one phase of this recipe."""
        from ..train import TrainConfig

        kw = dict(mode=self.mode if mode is None else mode, epochs=int(epochs),
                  batch_size=self.batch_size, lr=self.lr if lr is None else lr,
                  momentum=self.momentum, weight_decay=self.weight_decay,
                  optimizer=self.optimizer, scheduler=self.scheduler, norm=self.norm,
                  eps=self.eps, alpha=self.alpha, steps=self.steps,
                  trades_beta=self.trades_beta, seed=self.seed)
        kw.update(overrides)
        return TrainConfig(**kw)

    def build_model(self, data=None) -> nn.Module:
        """A freshly initialised ``arch`` (seeded by ``seed``) sized for ``data``."""
        from ..models import get_model

        kw: Dict[str, Any] = {}
        num_classes, in_channels = 10, 3
        if data is not None:
            num_classes = int(data.num_classes)
            in_channels = int(data.input_shape[0])
            if getattr(data, "mean", ()):
                kw.update(mean=data.mean, std=data.std)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return get_model(self.arch, num_classes=num_classes, in_channels=in_channels, **kw)

    def load_data(self):
        from ..data import get_dataset

        return get_dataset(self.dataset)


# ----------------------------------------------------------------------------------- taxonomy tags

TRAINING_TYPES = ("AT", "AT(PGD)", "AT(TRADES)", "NT", "KD", "KD+FGSM", "CNI", "FGSM", "FAST-AT",
                  "None", "n.s.")
CRITERIA = ("LWM", "SOLWM", "RELWM", "LIS", "HGM", "BCS", "random")


@dataclass(frozen=True)
class TaxonomyTags:
    """Where a method sits in the survey's taxonomy (Piras et al., arXiv 2409.01249).

    Attributes:
        pipeline: "A" (prune after training), "B" (before training) or "D" (during training).
        training: training type of each phase. A: ``(pretraining, finetuning)``; B:
            ``(pruning step, training step)``; D: ``(training,)``. Codes: AT (with the loss in
            brackets when the paper fixes it, e.g. "AT(TRADES)"), NT, KD, CNI, FGSM, FAST-AT,
            "None" (no such phase), "n.s." (not specified).
        schedule: "1S" (one-shot) or "IT" (iterative); None for pipeline D.
        structure: "US" and/or "S".
        granularity: for S: "filters", "channels" or "kernels"; else None.
        locality: "L" and/or "G"; empty when not specified.
        criterion: LWM, SOLWM, RELWM, LIS, HGM or BCS ("random" for the random baseline).
    """

    pipeline: str
    training: Tuple[str, ...]
    schedule: Optional[str]
    structure: Tuple[str, ...]
    granularity: Optional[str]
    locality: Tuple[str, ...]
    criterion: str

    def __post_init__(self):
        if self.pipeline not in ("A", "B", "D"):
            raise ValueError(f"pipeline must be 'A', 'B' or 'D', got {self.pipeline!r}")
        expected = 1 if self.pipeline == "D" else 2
        if len(self.training) != expected:
            raise ValueError(f"pipeline {self.pipeline} needs {expected} training types, got {self.training}")
        if self.schedule not in (("1S", "IT") if self.pipeline != "D" else (None,)):
            raise ValueError(f"schedule {self.schedule!r} does not fit pipeline {self.pipeline}")
        if not set(self.structure) <= {"US", "S"} or not self.structure:
            raise ValueError(f"structure must be a non-empty subset of ('US', 'S'), got {self.structure}")
        if not set(self.locality) <= {"L", "G"}:
            raise ValueError(f"locality must be a subset of ('L', 'G'), got {self.locality}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")

    @property
    def phases(self) -> Tuple[str, ...]:
        """Names of the phases ``training`` refers to."""
        return {"A": ("pretraining", "finetuning"), "B": ("pruning step", "training step"),
                "D": ("training",)}[self.pipeline]

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------- structure

STRUCTURES = ("unstructured", "filter")
_STRUCTURE_ALIASES = {"unstructured": "unstructured", "us": "unstructured",
                      "filter": "filter", "filters": "filter", "structured": "filter",
                      "channel": "filter", "channels": "filter", "s": "filter"}


def normalize_structure(structure: str) -> str:
    """Canonical structure name ("unstructured" or "filter")."""
    if not isinstance(structure, str) or structure.lower() not in _STRUCTURE_ALIASES:
        raise ValueError(f"structure must be one of {sorted(_STRUCTURE_ALIASES)}, got {structure!r}")
    return _STRUCTURE_ALIASES[structure.lower()]


def prunable_layers(model: nn.Module, structure: str = "unstructured") -> List[Tuple[str, nn.Module]]:
    """The layers whose weights count as prunable (see the module docstring)."""
    structure = normalize_structure(structure)
    layers = list(masked_layers(model))
    if structure == "filter":
        layers = [(n, m) for n, m in layers if isinstance(m, MaskedConv2d) and m.groups == 1]
    return layers


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
                k[i] += 1; diff -= 1; changed = True
            elif diff < 0 and k[i] > lo[i]:
                k[i] -= 1; diff += 1; changed = True
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


# ----------------------------------------------------------------------------------- channels

def following_batchnorms(model: nn.Module, example: Tensor) -> Dict[nn.Module, nn.Module]:
    """Map each conv to the BatchNorm2d that directly consumes its output (if any).

    Found by running ``example`` once and matching tensor identity (the BN's input *is* the
    conv's output), which is exact for any architecture, residual or not.
    """
    outputs: Dict[int, nn.Module] = {}
    pairs: Dict[nn.Module, nn.Module] = {}
    hooks = []

    def conv_hook(mod, inp, out):
        outputs[id(out)] = mod

    def bn_hook(mod, inp):
        src = outputs.get(id(inp[0]))
        if src is not None:
            pairs[src] = mod

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(bn_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            keep_alive = []  # hold outputs so ids are not reused during the pass

            def hold(mod, inp, out):
                keep_alive.append(out)
            hooks += [m.register_forward_hook(hold) for m in model.modules() if isinstance(m, nn.Conv2d)]
            model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return pairs


@torch.no_grad()
def zero_pruned_channels_(layers: Iterable[nn.Module], bn_of: Dict[nn.Module, nn.Module]) -> None:
    """For every conv filter whose mask row is all zero: zero its bias and its BatchNorm channel.

    Call after each optimiser step (train's ``on_step``) so the channel stays exactly zero and
    ``apb_sparse.compact`` can remove it.
    """
    for layer in layers:
        if not isinstance(layer, MaskedConv2d):
            continue
        dead = layer.weight_mask.flatten(1).amax(dim=1) == 0
        if not bool(dead.any()):
            continue
        if layer.bias is not None:
            layer.bias[dead] = 0
        bn = bn_of.get(layer)
        if bn is not None:
            if bn.weight is not None:
                bn.weight[dead] = 0
            if bn.bias is not None:
                bn.bias[dead] = 0


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


def chain_steps(*fns: Optional[Callable]) -> Optional[Callable]:
    """Combine several ``on_step(step, model)`` callbacks (None entries skipped)."""
    fns = [f for f in fns if f is not None]
    if not fns:
        return None

    def on_step(step, model):
        for f in fns:
            f(step, model)
    return on_step


@torch.no_grad()
def reinitialize_(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw every parameter with the modules' own ``reset_parameters`` under ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if m is not model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
    for _, l in masked_layers(model):
        l.weight_mask.fill_(1.0)
    return model


# ----------------------------------------------------------------------------------- context

@dataclass
class PruneResult:
    """What ``PruningMethod.prune`` returns.

    Attributes:
        model: the pruned model (Masked layers with final masks, pruned weights zero).
        log: ``method``, ``structure``, ``target_sparsity``, ``sparsity`` (measured over the
            prunable weights), ``sparsity_all`` (over every masked layer), ``phases`` (a list of
            dicts with the phase name, its epochs and train.py's log), ``seconds`` and
            method-specific entries.
    """

    model: nn.Module
    log: Dict[str, Any] = field(default_factory=dict)


class PruneContext:
    """State of one ``prune`` call, handed to ``PruningMethod._run``.

    Attributes: ``model``, ``data``, ``sparsity``, ``structure``, ``recipe``, ``pretrained``,
    ``log``; ``layers`` (prunable layers), ``all_layers`` (every masked layer).
    """

    def __init__(self, method: "PruningMethod", model: nn.Module, data, sparsity: float,
                 structure: str, recipe: Recipe, pretrained: bool):
        self.method = method
        self.model = model
        self.data = data
        self.sparsity = float(sparsity)
        self.structure = structure
        self.recipe = recipe
        self.pretrained = pretrained
        self.log: Dict[str, Any] = {"method": method.name, "structure": structure,
                                    "target_sparsity": self.sparsity, "phases": [],
                                    "hparams": dict(method.hparams)}
        self.named_layers = prunable_layers(model, structure)
        self.layers = [l for _, l in self.named_layers]
        self.all_layers = [l for _, l in masked_layers(model)]
        self._bn_of: Optional[Dict[nn.Module, nn.Module]] = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def structured(self) -> bool:
        return self.structure == "filter"

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps in one epoch of this call's data at ``recipe.batch_size``."""
        return max(1, math.ceil(len(self.data.train) / self.recipe.batch_size))

    def example_input(self, n: int = 2) -> Tensor:
        shape = tuple(getattr(self.data, "input_shape", (3, 32, 32)))
        return torch.zeros((n,) + shape, device=self.device)

    @property
    def bn_of(self) -> Dict[nn.Module, nn.Module]:
        if self._bn_of is None:
            self._bn_of = following_batchnorms(self.model, self.example_input())
        return self._bn_of

    def channel_hook(self) -> Optional[Callable]:
        """``on_step`` that keeps pruned channels (bias, BN) at zero; None when unstructured."""
        if not self.structured:
            return None
        bn_of = self.bn_of
        layers = self.layers

        def on_step(step, model):
            zero_pruned_channels_(layers, bn_of)
        return on_step

    def train(self, phase: str, epochs: int, *, mode: Optional[str] = None, lr: Optional[float] = None,
              params=None, loss_fn=None, extra_loss=None, on_step=None, config_overrides=None):
        """Run one phase with ``apb_sparse.train.train`` and record it in the log."""
        entry = {"phase": phase, "epochs": int(epochs), "mode": mode or self.recipe.mode}
        self.log["phases"].append(entry)
        if epochs <= 0:
            return None
        from ..train import train

        config = self.recipe.train_config(epochs, mode=mode, lr=lr, **(config_overrides or {}))
        # The optimisation budget of the phase (the benchmark compares pipelines by it).
        entry.update(lr=float(config.lr), scheduler=config.scheduler)
        t0 = time.perf_counter()
        tlog = train(self.model, self.data, config, params=params, loss_fn=loss_fn,
                     extra_loss=extra_loss, on_step=chain_steps(on_step, self.channel_hook()),
                     progress=self.recipe.progress)
        entry["seconds"] = time.perf_counter() - t0
        entry["steps"] = int(tlog.steps)
        entry["train_log"] = tlog
        return tlog

    def pretrain(self) -> None:
        """Pipeline A's dense pretraining (skipped for a pretrained model)."""
        if self.pretrained:
            self.log["phases"].append({"phase": "pretrain", "epochs": 0, "skipped": "pretrained"})
            return
        self.train("pretrain", self.recipe.pretrain_epochs, lr=self.recipe.lr)

    def finetune(self, epochs: Optional[int] = None, **kw):
        """Masked finetuning at ``recipe.finetune_lr`` (masks fixed; train re-applies them)."""
        e = self.recipe.finetune_epochs if epochs is None else epochs
        kw.setdefault("lr", self.recipe.finetune_lr)
        return self.train("finetune", e, **kw)

    # -------------------------------------------------------------- mask construction
    def unit_scores_to_masks(self, layer_scores: Sequence[Tensor], *, local: bool,
                             sparsity: Optional[float] = None) -> List[Tensor]:
        """Turn per-weight scores into final masks for this call's structure and locality.

        For ``structure="filter"`` the scores are reduced per output filter (L2 norm of the
        per-weight scores) unless they already have one entry per filter.
        """
        s = self.sparsity if sparsity is None else sparsity
        min_keep = self.method.min_keep
        if not self.structured:
            return (local_masks if local else global_masks)(layer_scores, s, min_keep=min_keep)
        unit = [sc if sc.dim() == 1 else sc.flatten(1).norm(dim=1) for sc in layer_scores]
        sizes = [l.weight[0].numel() for l in self.layers]
        fm = (unit_masks_local if local else unit_masks_global)(unit, sizes, s, min_keep=min_keep)
        return [expand_filter_mask(l, m) for l, m in zip(self.layers, fm)]

    def set_masks(self, masks: Sequence[Tensor]) -> None:
        install_masks(self.layers, masks)
        if self.structured:
            zero_pruned_channels_(self.layers, self.bn_of)


# ----------------------------------------------------------------------------------- base class

class PruningMethod:
    """Base class: hyper-parameters in ``__init__``, taxonomy tags as class data, ``prune``.

    Subclasses set ``name``, ``tags``, ``structures`` (supported structures) and implement
    ``_run(ctx)``, which must leave final masks on ``ctx.layers`` (via ``ctx.set_masks``) and no
    ``mask_fn`` installed. ``prune`` does the bookkeeping: copying / building / re-initialising
    the model, seeding, and checking the result.

    Args:
        min_keep: weights (unstructured) or filters (structured) every layer keeps at least.
        **hparams: method-specific hyper-parameters (see each subclass).
    """

    name: ClassVar[str] = ""
    tags: ClassVar[TaxonomyTags]
    structures: ClassVar[Tuple[str, ...]] = ("unstructured",)
    paper: ClassVar[str] = ""
    #: Where this implementation departs from the authors' code (one line, for the leaderboard's
    #: notes column; empty when it follows it). Details: docs/methods.md.
    notes: ClassVar[str] = ""
    #: Authors' public code.
    code_url: ClassVar[str] = ""

    def __init__(self, *, min_keep: int = 1, **hparams):
        if not isinstance(min_keep, int) or min_keep < 0:
            raise ValueError(f"min_keep must be an int >= 0, got {min_keep!r}")
        self.min_keep = min_keep
        self.hparams: Dict[str, Any] = {"min_keep": min_keep, **hparams}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({args})"

    # Hook for subclasses: the work between model preparation and the final check.
    def _run(self, ctx: PruneContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def prune(self, model: Optional[nn.Module], data=None, *, sparsity: float,
              structure: str = "unstructured", recipe: Optional[Recipe] = None,
              pretrained: bool = False) -> PruneResult:
        """Prune (and train) a model to exactly ``sparsity`` of its prunable weights.

        Args:
            model: the network (not modified; a copy is pruned), or None to build
                ``recipe.arch`` with ``get_model``. Conv / Linear layers are converted to masked
                layers. Pipeline-A methods start from its weights; B/D methods use them as the
                initialisation (re-drawn when ``pretrained``).
            data: a ``DatasetBundle`` (``apb_sparse.data.get_dataset``); None loads
                ``recipe.dataset``.
            sparsity: fraction of prunable weights to remove, in [0, 1).
            structure: "unstructured" or "filter" (whole output filters; aliases "structured",
                "channel"); must be in ``self.structures``.
            recipe: the shared :class:`Recipe` (default ``Recipe()``).
            pretrained: the model's weights are already (adversarially) trained: pipeline-A
                methods skip dense pretraining.

        Returns:
            :class:`PruneResult` with the pruned model and a log.

        Raises:
            ValueError: bad ``sparsity`` or unsupported ``structure``.
            TypeError: ``model`` is not an ``nn.Module``.
        """
        structure = normalize_structure(structure)
        if structure not in self.structures:
            raise ValueError(f"{self.name} supports structure in {self.structures}, got {structure!r}")
        if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity must be a float in [0, 1), got {sparsity!r}")
        recipe = Recipe() if recipe is None else recipe
        if not isinstance(recipe, Recipe):
            raise TypeError(f"recipe must be an apb_sparse.methods.Recipe, got {type(recipe).__name__}")
        if data is None:
            data = recipe.load_data()
        if model is None:
            model = recipe.build_model(data)
            pretrained = False
        elif not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        else:
            model = copy.deepcopy(model)
        model = to_masked(model, inplace=True)
        for _, l in masked_layers(model):
            l.mask_fn = None
        if self.tags.pipeline in ("B", "D") and pretrained:
            reinitialize_(model, recipe.seed)
        model.train()

        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            ctx = PruneContext(self, model, data, float(sparsity), structure, recipe, pretrained)
            if not ctx.layers:
                raise ValueError(f"model has no prunable layers for structure {structure!r}")
            self._run(ctx)
            self._finalize(ctx)
        ctx.log["seconds"] = time.perf_counter() - t0
        return PruneResult(model, ctx.log)

    def _finalize(self, ctx: PruneContext) -> None:
        for name, l in masked_layers(ctx.model):
            if l.mask_fn is not None:
                raise RuntimeError(f"{self.name} left a mask_fn installed on layer {name!r}")
            with torch.no_grad():
                l.weight_mask.copy_((l.weight_mask != 0).to(l.weight_mask.dtype))
                l.apply_mask_()
            l.weight.requires_grad_(True)
            if l.bias is not None:
                l.bias.requires_grad_(True)
        for p in ctx.model.parameters():
            p.requires_grad_(True)
        if ctx.structured:
            zero_pruned_channels_(ctx.layers, ctx.bn_of)
        ctx.log["sparsity"] = measured_sparsity(ctx.layers)
        ctx.log["sparsity_all"] = measured_sparsity(ctx.all_layers)
        ctx.log["layer_sparsity"] = {n: l.sparsity for n, l in ctx.named_layers}


# ----------------------------------------------------------------------------------- registry

_REGISTRY: Dict[str, Type[PruningMethod]] = {}


def register(cls: Type[PruningMethod]) -> Type[PruningMethod]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    key = cls.name.lower()
    if key in _REGISTRY and _REGISTRY[key] is not cls:
        raise ValueError(f"a pruning method named {cls.name!r} is already registered")
    _REGISTRY[key] = cls
    return cls


def available() -> List[str]:
    """Names of the registered methods, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Type[PruningMethod]:
    """The method class registered under ``name`` (case-insensitive)."""
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        raise ValueError(f"unknown pruning method {name!r}; expected one of {available()}")
    return _REGISTRY[name.lower()]
