"""Sparsity reports: per-layer layouts, nonzeros and multiply-adds of a (converted) model
(:func:`sparsity_report`)."""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..nn.masked import MaskedLayer
from ..nn.sparse import SparseConv2d
from .layouts import layout_of
from .deployed import DeployedModel
from .sparsify import SPARSE_LAYERS, _converter_for, _effective_weight, _standard_forward

__all__ = ["sparsity_report", "SparsityReport", "LayerReport"]


@dataclass
class LayerReport:
    """One layer of a :class:`SparsityReport` (multiply-adds per input batch of the given size)."""

    name: str
    kind: str
    layout: str
    shape: List[int]
    numel: int
    nonzeros: int
    sparsity: float
    dense_macs: Optional[int]
    sparse_macs: Optional[int]

    @property
    def path(self) -> str:
        """Deprecated name of :attr:`layout` (version 0.2)."""
        warnings.warn("LayerReport.path is renamed LayerReport.layout", DeprecationWarning, stacklevel=2)
        return self.layout


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
        head = f"{'layer':<28} {'kind':<20} {'layout':<12} {'nonzeros':>10} {'sparsity':>9} {'dense MACs':>12} {'sparse MACs':>12}"
        rows = [head, "-" * len(head)]

        def fmt(v):
            return "-" if v is None else f"{v:,}"
        for l in self.layers:
            rows.append(f"{l.name:<28} {l.kind:<20} {l.layout:<12} {l.nonzeros:>10,} {l.sparsity:>9.4f} "
                        f"{fmt(l.dense_macs):>12} {fmt(l.sparse_macs):>12}")
        rows.append(f"{'total':<28} {'':<20} {'':<12} {self.nonzeros:>10,} {self.sparsity:>9.4f} "
                    f"{fmt(self.dense_macs):>12} {fmt(self.sparse_macs):>12}")
        return "\n".join(rows)


_REPORTED = (nn.Conv2d, nn.Linear) + SPARSE_LAYERS


def _layer_weight(layer: nn.Module) -> Tensor:
    if isinstance(layer, SPARSE_LAYERS):
        return layer.to_dense().weight.detach()
    return _effective_weight(layer, None)


def _layout_name(layer: nn.Module) -> str:
    if layout_of(layer) is not None:
        return layout_of(layer)
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
    if isinstance(model, DeployedModel):  # its converted model (layer names as in the source)
        model = model.module
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
                    if isinstance(mod, SparseConv2d) and (mod.fused_prev is not None or mod.fused_pool) \
                            and inp[0].dim() == 4:
                        # deploy's fusions: a pair's first conv (and shortcut) ran in this call, or
                        # the output is pooled; sizes from the input
                        n, _, h, w = inp[0].shape
                        if mod.fused_prev is not None:
                            h, w = mod.fused_prev._out_hw(h, w)
                            outputs[mod.fused_prev_name] = n * h * w
                        h, w = mod._out_hw(h, w)
                        outputs[name] = n * h * w
                        if mod.fused_shortcut is not None:
                            outputs[mod.fused_shortcut_name] = n * h * w
                    elif out.dim() == 4:
                        outputs[name] = out.shape[0] * out.shape[2] * out.shape[3]
                    else:
                        outputs[name] = out[..., :1].numel()  # out.numel() / features, also for 0 features
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
        if not isinstance(layer, SPARSE_LAYERS) and not _standard_forward(layer) and _converter_for(layer) is None:
            # Its forward may compute with another weight (weight standardisation turns zeros
            # into nonzeros): reported dense, as sparsify leaves it.
            nnz = w.numel()
        pos = outputs.get(name)
        layers.append(LayerReport(
            name=name, kind=type(layer).__name__, layout=_layout_name(layer), shape=list(w.shape), numel=w.numel(),
            nonzeros=nnz, sparsity=1.0 - nnz / max(1, w.numel()),
            dense_macs=None if pos is None else pos * w.numel(),
            sparse_macs=None if pos is None else pos * nnz))
    return SparsityReport(layers, input_size)


