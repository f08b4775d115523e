"""Model conversion: masks -> sparse deployment layers and back; sparsity reports.

``sparsify`` picks, per layer, the cheapest of three paths by an expected-cost model:

* ``"dense"``: keep ``nn.Conv2d`` / ``nn.Linear`` (vendor kernel) on ``weight * mask``;
* ``"unstructured"``: :class:`~apb_sparse.nn.SparseConv2d` / :class:`~apb_sparse.nn.SparseLinear`
  (CSR nonzeros, the row-gather kernel);
* ``"structured"``: :class:`~apb_sparse.nn.ChannelSparseConv2d` (dense block of the kept filters
  and input channels).

Costs are relative to the dense layer: dense = 1, unstructured = density / UNSTRUCTURED_EFFICIENCY,
structured = kept-block density / STRUCTURED_EFFICIENCY.  The efficiencies are the rate at which
each path does its useful multiply-adds compared with the dense vendor kernel; they were measured
with ``benchmarks/latency.py --per-layer`` on the 2-core AVX2 development machine.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .nn.masked import MaskedConv2d, MaskedLayer, MaskedLinear
from .nn.sparse import ChannelSparseConv2d, SparseConv2d, SparseLinear

__all__ = ["sparsify", "densify", "sparsity_report", "SparsityReport", "LayerReport", "magnitude_masks",
           "apply_masks", "PATHS", "UNSTRUCTURED_EFFICIENCY", "STRUCTURED_EFFICIENCY"]

PATHS = ("auto", "dense", "unstructured", "structured")
UNSTRUCTURED_EFFICIENCY = 0.35
STRUCTURED_EFFICIENCY = 0.9
SPARSE_LAYERS = (SparseConv2d, SparseLinear, ChannelSparseConv2d)


@dataclass
class LayerChoice:
    """Why ``sparsify`` chose a layer's path: densities and the expected relative costs."""

    path: str
    density: float
    block_density: Optional[float]
    cost: Dict[str, float] = field(default_factory=dict)


def _effective_weight(layer: nn.Module, mask: Optional[Tensor]) -> Tensor:
    w = layer.weight.detach()
    if isinstance(layer, MaskedLayer):
        w = w * layer.get_mask().detach()
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"masks values must be tensors, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(w.shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the weight's shape {tuple(w.shape)}")
        w = w * mask.to(device=w.device, dtype=w.dtype)
    return w


def _choose(layer: nn.Module, weight: Tensor, path: str) -> LayerChoice:
    numel = max(1, weight.numel())
    density = float(weight.count_nonzero()) / numel
    block = None
    cost = {"dense": 1.0, "unstructured": density / UNSTRUCTURED_EFFICIENCY}
    if isinstance(layer, nn.Conv2d) and layer.groups == 1:
        nz = weight != 0
        kept_out = int(nz.flatten(1).any(1).sum())
        kept_in = int(nz.transpose(0, 1).flatten(1).any(1).sum())
        block = kept_out * kept_in / max(1, weight.shape[0] * weight.shape[1])
        cost["structured"] = block / STRUCTURED_EFFICIENCY
    if path == "auto":
        chosen = min(cost, key=cost.get)
    elif path in cost:
        chosen = path
    else:
        chosen = "unstructured"  # structured requested on a layer that cannot take it
    return LayerChoice(chosen, density, block, cost)


def _convert(layer: nn.Module, weight: Tensor, path: str) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        if path == "unstructured":
            return SparseConv2d.from_dense(_plain(layer, weight))
        if path == "structured":
            return ChannelSparseConv2d.from_dense(_plain(layer, weight))
        return _plain(layer, weight)
    if path == "unstructured":
        return SparseLinear.from_dense(_plain(layer, weight))
    return _plain(layer, weight)


def _plain(layer: nn.Module, weight: Tensor) -> nn.Module:
    """A plain nn.Conv2d / nn.Linear holding ``weight`` (the layer's bias is kept)."""
    if isinstance(layer, nn.Conv2d):
        out = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                        device=weight.device, dtype=weight.dtype)
    else:
        out = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device=weight.device,
                        dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    out.train(layer.training)
    return out


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model


def _prunable(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _calibrate(model: nn.Module, layers, masks: Mapping[str, Tensor], example_input: Tensor,
               rounds: int) -> Dict[str, Dict[str, float]]:
    """Measured cost (median seconds) of each candidate path of every layer on its real input."""
    from .bench.timing import interleaved_medians

    inputs: Dict[str, Tensor] = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, n=name: inputs.__setitem__(n, i[0].detach()))
             for name, layer in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    costs = {}
    for name, layer in layers:
        if name not in inputs:
            continue
        weight = _effective_weight(layer, masks.get(name))
        candidates = {"dense": _plain(layer, weight).eval()}
        if weight.count_nonzero() < weight.numel():
            candidates["unstructured"] = _convert(layer, weight, "unstructured")
            if isinstance(layer, nn.Conv2d) and layer.groups == 1:
                candidates["structured"] = _convert(layer, weight, "structured")
        x = inputs[name]
        t = interleaved_medians({k: (lambda m=m: m(x)) for k, m in candidates.items()}, rounds=rounds, warmup=1,
                                min_time=1e-3)
        costs[name] = {k: v["median_s"] for k, v in t.items()}
    return costs


def sparsify(model: nn.Module, masks: Optional[Mapping[str, Tensor]] = None, *, inplace: bool = False,
             path: Union[str, Mapping[str, str]] = "auto", fuse: bool = False,
             calibrate: Optional[Tensor] = None, calibrate_rounds: int = 5) -> nn.Module:
    """Replace each ``nn.Conv2d`` / ``nn.Linear`` (masked ones included) by its sparse counterpart.

    Args:
        model: any model; dense layers with zeros (checkpoints of any pruning tool) work directly.
        masks: optional ``{module name: 0/1 tensor shaped like its weight}``; else the masks of
            masked layers and the zeros already in the weights are used.
        inplace: modify ``model`` instead of a deep copy.
        path: ``"auto"`` (per-layer choice by expected cost), or force ``"dense"``,
            ``"unstructured"`` or ``"structured"`` (layers that cannot take the structured path,
            grouped convs and linear layers, use the unstructured one); or a mapping
            ``{layer name: path}`` (e.g. the paths of a saved model, to rebuild it before
            ``load_state_dict``; layers not named use ``"auto"``).
        fuse: inference-only fusions (the model must be in eval mode): fold BatchNorms into the
            preceding convs and move ReLUs / residual adds into the sparse kernels' epilogue
            (see :mod:`apb_sparse.fuse`). The result is an ``fx.GraphModule``.
        calibrate: an example input batch; with it, ``"auto"`` layers take the path measured
            fastest on their real input (interleaved medians of ``calibrate_rounds`` rounds)
            instead of the analytic cost model, and ``LayerChoice.cost`` holds the seconds.

    Returns:
        The converted model.  ``model.apb_sparse_choices`` maps each converted layer's name to a
        :class:`LayerChoice` (path, densities, expected costs).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    per_layer = dict(path) if isinstance(path, Mapping) else {}
    default = "auto" if isinstance(path, Mapping) else path
    for p in [default, *per_layer.values()]:
        if p not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {p!r}")
    layers = _prunable(model)
    unknown_paths = sorted(set(per_layer) - {n for n, _ in layers})
    if unknown_paths:
        raise ValueError(f"path names layers that are not Conv2d/Linear layers of the model: {unknown_paths}")
    masks = dict(masks or {})
    unknown = sorted(set(masks) - {n for n, _ in layers})
    if unknown:
        raise ValueError(f"masks has keys that are not Conv2d/Linear layers of the model: {unknown}")
    if not inplace:
        model = copy.deepcopy(model)
        layers = _prunable(model)
    if fuse:
        from .fuse import fold_batchnorm

        model = fold_batchnorm(model, inplace=True)
        layers = _prunable(model)
    measured: Dict[str, Dict[str, float]] = {}
    if calibrate is not None:
        if not isinstance(calibrate, Tensor):
            raise TypeError(f"calibrate must be an example input tensor, got {type(calibrate).__name__}")
        if calibrate_rounds < 1:
            raise ValueError(f"calibrate_rounds must be >= 1, got {calibrate_rounds}")
        measured = _calibrate(model, layers, masks, calibrate, calibrate_rounds)
    choices: Dict[str, LayerChoice] = {}
    for name, layer in layers:
        weight = _effective_weight(layer, masks.get(name))
        choice = _choose(layer, weight, per_layer.get(name, default))
        if name in measured and per_layer.get(name, default) == "auto":
            choice.cost = measured[name]
            choice.path = min(measured[name], key=measured[name].get)
        model = _replace(model, name, _convert(layer, weight, choice.path))
        choices[name] = choice
    if fuse:
        from .fuse import fuse_activations

        model = fuse_activations(model)
    model.apb_sparse_choices = choices
    return model


def densify(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Equivalent model with plain ``nn.Conv2d`` / ``nn.Linear`` layers (sparse and masked layers
    become dense layers holding their effective weights)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    for name, layer in list(model.named_modules()):
        if isinstance(layer, SPARSE_LAYERS + MaskedLayer):
            model = _replace(model, name, layer.to_dense())
    if hasattr(model, "apb_sparse_choices"):
        del model.apb_sparse_choices
    return model


# ----------------------------------------------------------------------------------------------
# Reports


@dataclass
class LayerReport:
    """One layer of a :class:`SparsityReport` (multiply-adds per input batch of the given size)."""

    name: str
    kind: str
    path: str
    shape: List[int]
    numel: int
    nonzeros: int
    sparsity: float
    dense_macs: Optional[int]
    sparse_macs: Optional[int]


@dataclass
class SparsityReport:
    """Per-layer and total sparsity, nonzeros and multiply-adds."""

    layers: List[LayerReport]
    input_size: Optional[List[int]]

    @property
    def numel(self) -> int:
        return sum(l.numel for l in self.layers)

    @property
    def nonzeros(self) -> int:
        return sum(l.nonzeros for l in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights over all conv/linear layers."""
        return 1.0 - self.nonzeros / max(1, self.numel)

    @property
    def dense_macs(self) -> Optional[int]:
        return None if self.input_size is None else sum(l.dense_macs for l in self.layers)

    @property
    def sparse_macs(self) -> Optional[int]:
        return None if self.input_size is None else sum(l.sparse_macs for l in self.layers)

    def to_dict(self) -> dict:
        return {"input_size": self.input_size, "numel": self.numel, "nonzeros": self.nonzeros,
                "sparsity": self.sparsity, "dense_macs": self.dense_macs, "sparse_macs": self.sparse_macs,
                "layers": [asdict(l) for l in self.layers]}

    def __str__(self) -> str:
        head = f"{'layer':<28} {'kind':<20} {'path':<12} {'nonzeros':>10} {'sparsity':>9} {'dense MACs':>12} {'sparse MACs':>12}"
        rows = [head, "-" * len(head)]

        def fmt(v):
            return "-" if v is None else f"{v:,}"
        for l in self.layers:
            rows.append(f"{l.name:<28} {l.kind:<20} {l.path:<12} {l.nonzeros:>10,} {l.sparsity:>9.4f} "
                        f"{fmt(l.dense_macs):>12} {fmt(l.sparse_macs):>12}")
        rows.append(f"{'total':<28} {'':<20} {'':<12} {self.nonzeros:>10,} {self.sparsity:>9.4f} "
                    f"{fmt(self.dense_macs):>12} {fmt(self.sparse_macs):>12}")
        return "\n".join(rows)


_REPORTED = (nn.Conv2d, nn.Linear) + SPARSE_LAYERS


def _layer_weight(layer: nn.Module) -> Tensor:
    if isinstance(layer, SPARSE_LAYERS):
        return layer.to_dense().weight.detach()
    return _effective_weight(layer, None)


def _path_of(layer: nn.Module) -> str:
    if isinstance(layer, SPARSE_LAYERS):
        return layer.path
    if isinstance(layer, MaskedLayer):
        return "masked"
    return "dense"


@torch.no_grad()
def sparsity_report(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> SparsityReport:
    """Sparsity, nonzeros and multiply-adds of every conv / linear layer (dense, masked or sparse).

    Args:
        model: the model.
        input_size: e.g. ``(1, 3, 32, 32)``; when given, one forward pass on zeros measures each
            layer's output size and the report includes dense and sparse multiply-adds.

    Returns:
        A :class:`SparsityReport` (``print`` it for a table; ``.to_dict()`` for JSON).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    outputs: Dict[str, int] = {}
    if input_size is not None:
        input_size = [int(s) for s in input_size]
        if any(s < 0 for s in input_size):
            raise ValueError(f"input_size must be non-negative, got {input_size}")
        hooks = []
        for name, layer in model.named_modules():
            if isinstance(layer, _REPORTED):
                def hook(mod, inp, out, name=name):
                    # Multiply-adds per weight: output positions (batch x spatial) sharing it.
                    if out.dim() == 4:
                        outputs[name] = out.shape[0] * out.shape[2] * out.shape[3]
                    else:
                        outputs[name] = out.numel() // out.shape[-1]
                hooks.append(layer.register_forward_hook(hook))
        p = next(iter(model.parameters()), None)
        if p is None:
            p = next(iter(model.buffers()))
        was_training = model.training
        model.eval()
        try:
            model(torch.zeros(input_size, dtype=p.dtype, device=p.device))
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
    layers = []
    for name, layer in model.named_modules():
        if not isinstance(layer, _REPORTED):
            continue
        w = _layer_weight(layer)
        nnz = int(w.count_nonzero())
        pos = outputs.get(name)
        layers.append(LayerReport(
            name=name, kind=type(layer).__name__, path=_path_of(layer), shape=list(w.shape), numel=w.numel(),
            nonzeros=nnz, sparsity=1.0 - nnz / max(1, w.numel()),
            dense_macs=None if pos is None else pos * w.numel(),
            sparse_macs=None if pos is None else pos * nnz))
    return SparsityReport(layers, input_size)


# ----------------------------------------------------------------------------------------------
# Magnitude masks (for users and benchmarks; the pruning methods have their own criteria)


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return float(sparsity)


def _keep_largest(scores: Tensor, n_keep: int) -> Tensor:
    """0/1 tensor keeping exactly ``n_keep`` largest entries of the 1-D ``scores``."""
    keep = torch.zeros_like(scores)
    if n_keep >= scores.numel():
        return keep.fill_(1)
    if n_keep > 0:
        keep[torch.topk(scores, n_keep, sorted=False).indices] = 1
    return keep


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsity: float, *, structure: str = "unstructured",
                    scope: str = "local", layers: Optional[Sequence[str]] = None,
                    coupled: bool = False) -> Dict[str, Tensor]:
    """Lowest-magnitude masks for every conv / linear layer.

    Args:
        model: the model (dense or masked).
        sparsity: fraction of weights (or, for ``structure="channels"``, of output filters of
            each conv layer) to remove, in [0, 1].
        structure: ``"unstructured"`` or ``"channels"`` (whole conv filters by L2 norm; linear
            layers are left dense).
        scope: ``"local"`` (every layer at ``sparsity``) or ``"global"`` (one magnitude threshold
            over all layers; unstructured only).
        layers: names of the layers to prune (default: all conv and linear layers).
        coupled: with ``structure="channels"``, drop the same filters (lowest summed L2 norm) in
            every conv that writes into one channel space (the convs joined by a residual add, see
            :func:`channel_groups`), so that :func:`compact` can remove all of them; otherwise
            each conv picks its own filters and a residual join keeps the union.

    Returns:
        ``{layer name: 0/1 mask}`` to pass to :func:`sparsify` or :func:`apply_masks`.
    """
    sparsity = _check_sparsity(sparsity)
    if structure not in ("unstructured", "channels"):
        raise ValueError(f"structure must be 'unstructured' or 'channels', got {structure!r}")
    if scope not in ("local", "global"):
        raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
    if structure == "channels" and scope == "global":
        raise ValueError("scope='global' is only supported with structure='unstructured'")
    all_layers = dict(_prunable(model))
    names = list(all_layers) if layers is None else list(layers)
    missing = [n for n in names if n not in all_layers]
    if missing:
        raise ValueError(f"layers not found among the model's Conv2d/Linear layers: {missing}")
    masks: Dict[str, Tensor] = {}
    if coupled and structure != "channels":
        raise ValueError("coupled=True needs structure='channels'")
    if structure == "channels" and coupled:
        from .compact import channel_groups

        for group in channel_groups(model):
            convs = [n for n in group["producers"] if n in names and isinstance(all_layers[n], nn.Conv2d)]
            if not convs:
                continue
            ws = [_effective_weight(all_layers[n], None) for n in convs]
            k = 0 if group["pinned"] else int(round(sparsity * ws[0].shape[0]))
            drop = torch.argsort(sum(w.flatten(1).norm(dim=1) for w in ws), stable=True)[:k]
            for n, w in zip(convs, ws):
                mask = torch.ones_like(w)
                mask[drop] = 0
                masks[n] = mask
        for n in names:  # layers in no group (linear, unused): dense
            if n not in masks:
                masks[n] = torch.ones_like(_effective_weight(all_layers[n], None))
        return masks
    if structure == "channels":
        for n in names:
            w = _effective_weight(all_layers[n], None)
            mask = torch.ones_like(w)
            if isinstance(all_layers[n], nn.Conv2d):
                k = int(round(sparsity * w.shape[0]))
                if k > 0:
                    norms = w.flatten(1).norm(dim=1)
                    drop = torch.argsort(norms, stable=True)[:k]
                    mask[drop] = 0
            masks[n] = mask
        return masks
    weights = {n: _effective_weight(all_layers[n], None) for n in names}
    if scope == "global":
        flat = torch.cat([w.abs().flatten() for w in weights.values()])
        keep = _keep_largest(flat, flat.numel() - int(round(sparsity * flat.numel())))
        offset = 0
        for n, w in weights.items():
            masks[n] = keep[offset:offset + w.numel()].reshape(w.shape).clone()
            offset += w.numel()
        return masks
    for n, w in weights.items():
        keep = _keep_largest(w.abs().flatten(), w.numel() - int(round(sparsity * w.numel())))
        masks[n] = keep.reshape(w.shape)
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, Tensor], *, inplace: bool = False) -> nn.Module:
    """Multiply each named layer's weight by its mask (masked layers: set their ``weight_mask``).

    Returns the "masked dense model" that :func:`sparsify` must reproduce.
    """
    if not inplace:
        model = copy.deepcopy(model)
    layers = dict(_prunable(model))
    unknown = sorted(set(masks) - set(layers))
    if unknown:
        raise ValueError(f"masks has keys that are not Conv2d/Linear layers of the model: {unknown}")
    for name, mask in masks.items():
        layer = layers[name]
        if isinstance(layer, MaskedLayer):
            layer.set_mask(mask)
        else:
            if tuple(mask.shape) != tuple(layer.weight.shape):
                raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, expected "
                                 f"{tuple(layer.weight.shape)}")
            layer.weight.mul_(mask.to(layer.weight.dtype))
    return model
