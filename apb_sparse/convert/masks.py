"""Masks: magnitude masks for users and benchmarks, and the one function that applies masks to a
model (the pruning methods have their own criteria, on masked layers)."""
from __future__ import annotations

import copy
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..nn.masked import MaskedLayer
from ..structures import normalize_structure
from .compact import channel_groups
from .sparsify import _effective_weight, _prunable

__all__ = ["magnitude_masks", "apply_masks"]


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
                    coupled: bool = False, example_input: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Lowest-magnitude masks for every conv / linear layer.

    Args:
        model: the model (dense or masked).
        sparsity: fraction of weights (or, for ``structure="filter"``, of output filters of
            each conv layer) to remove, in [0, 1].
        structure: ``"unstructured"`` or ``"filter"`` (whole conv filters by L2 norm; linear
            layers are left dense).  Older spellings (``"channels"``, ``"structured"``) are
            aliases (:mod:`apb_sparse.structures`).
        scope: ``"local"`` (every layer at ``sparsity``) or ``"global"`` (one magnitude threshold
            over all layers; unstructured only).
        layers: names of the layers to prune (default: all conv and linear layers).
        coupled: with ``structure="filter"``, drop the same filters (lowest summed L2 norm) in
            every conv that writes into one channel space (the convs joined by a residual add, see
            :func:`channel_groups`), so that :func:`compact` can remove all of them; otherwise
            each conv picks its own filters and a residual join keeps the union.
        example_input: with ``coupled=True``, an input the model accepts, to trace its channel
            spaces (default: zero images of 32x32, 28x28, then 8x8 pixels are tried).

    Returns:
        ``{layer name: 0/1 mask}`` to pass to :func:`sparsify` or :func:`apply_masks`.
    """
    sparsity = _check_sparsity(sparsity)
    structure = normalize_structure(structure)
    if scope not in ("local", "global"):
        raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
    if structure == "filter" and scope == "global":
        raise ValueError("scope='global' is only supported with structure='unstructured'")
    all_layers = dict(_prunable(model))
    names = list(all_layers) if layers is None else list(layers)
    missing = [n for n in names if n not in all_layers]
    if missing:
        raise ValueError(f"layers not found among the model's Conv2d/Linear layers: {missing}")
    masks: Dict[str, Tensor] = {}
    if coupled and structure != "filter":
        raise ValueError("coupled=True needs structure='filter'")
    if example_input is not None and not coupled:
        raise ValueError("example_input is only used with coupled=True (to trace the channel spaces)")
    if example_input is not None and not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    if structure == "filter" and coupled:
        # Linear layers keep all their weights under structure="filter": with no conv to
        # prune there is nothing to couple (and no image input to trace the model with).
        has_conv = any(isinstance(all_layers[n], nn.Conv2d) for n in names)
        for group in channel_groups(model, example_input) if has_conv else []:
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
    if structure == "filter":
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
