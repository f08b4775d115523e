"""The registry of deployment layouts: what a layer can become, and what each choice costs.

A layout is a name, the layer classes that implement it for convolutions and linear maps (each
with ``from_dense(layer)`` and ``to_dense()``, and its own state_dict buffers), and an expected
cost relative to the dense vendor kernel (1.0).  ``sparsify`` asks every layout for its cost and
takes the cheapest; ``densify``, ``sparsity_report``, the fusions and ``compact`` recognise
converted layers through :func:`layout_of`.  A new layout is one file that defines its layer
classes and calls :func:`register_layout`.

Costs are the fraction of the dense multiply-adds a layout computes, divided by the rate at which
it does them compared with the dense vendor kernel; the rates were measured with
``benchmarks/latency.py --per-layer`` on the 2-core development machines (see the constants).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from torch import Tensor, nn

from ..nn.sparse import ChannelSparseConv2d, SparseConv2d, SparseLinear

__all__ = ["Layout", "LAYOUTS", "register_layout", "layout_of", "normalize_layout", "LAYOUT_ALIASES", "layer_classes", "UNSTRUCTURED_EFFICIENCY",
           "SPATIAL_EFFICIENCY", "STRUCTURED_EFFICIENCY", "STEM_TAPS", "STEM_EFFICIENCY"]

UNSTRUCTURED_EFFICIENCY = 0.35
"""Rate of the CSR kernel's useful multiply-adds relative to the dense vendor kernel: linear layers
and 1x1 convs (1x1 stride-2 shortcuts at batch 32 measured 0.25-0.3, at batch 1 0.4-0.6)."""
SPATIAL_EFFICIENCY = 0.6
"""The same for convs with a kernel of at least 3x3 (nine taps per input channel), where the
kernel reuses every loaded input value across taps: ResNet-18's 3x3 shapes at batch 1 and 32 broke
even with the vendor conv at 60-75 % density (0.61-0.66x its time at 39 %), AVX2 Zen 3, 2 threads
(docs/performance.md, "Layout choice")."""
STRUCTURED_EFFICIENCY = 0.9
"""Rate of the kept dense block relative to the whole dense layer (gathers, a smaller GEMM)."""
STEM_TAPS = 32
"""A conv with at most this many taps per filter (1- or 3-channel images) is a stem conv."""
STEM_EFFICIENCY = 1.0
"""Stem convs: the vendor kernel has no input channels to block over; ours measured as fast or
faster even fully dense (0.7-1.25x without the lanes layout, 7-10x with it on 8x8 digits)."""


@dataclass(frozen=True)
class Layout:
    """One deployment layout.

    Attributes:
        name: the name users pass to ``sparsify(layout=...)`` / ``deploy(layout=...)`` and see in
            ``LayerChoice.layout``.
        conv: layer class for ``nn.Conv2d`` (None: convs cannot take it).
        linear: layer class for ``nn.Linear`` (None: linear layers cannot take it).
        cost: ``cost(layer, weight) -> relative cost or None`` (None: not applicable to this layer).
        describe: ``describe(layer, weight) -> dict`` of extra numbers kept in ``LayerChoice``.
    """

    name: str
    conv: Optional[type]
    linear: Optional[type]
    cost: Callable[[nn.Module, Tensor], Optional[float]]

    def layer_class(self, layer: nn.Module) -> Optional[type]:
        """The class implementing this layout for ``layer`` (None if it cannot take it)."""
        if isinstance(layer, nn.Conv2d):
            return self.conv
        return self.linear


def _density(weight: Tensor) -> float:
    return float(weight.count_nonzero()) / max(1, weight.numel())


def _is_stem(layer: nn.Module, weight: Tensor) -> bool:
    return isinstance(layer, nn.Conv2d) and weight.shape[0] > 0 and weight[0].numel() <= STEM_TAPS


def block_density(layer: nn.Module, weight: Tensor) -> Optional[float]:
    """Kept filters x kept input channels over all of them (the structured layout's dense block),
    for an ungrouped conv; None otherwise."""
    if not (isinstance(layer, nn.Conv2d) and layer.groups == 1):
        return None
    nz = weight != 0
    kept_out = int(nz.flatten(1).any(1).sum())
    kept_in = int(nz.transpose(0, 1).flatten(1).any(1).sum())
    return kept_out * kept_in / max(1, weight.shape[0] * weight.shape[1])


def _is_spatial(layer: nn.Module, weight: Tensor) -> bool:
    return isinstance(layer, nn.Conv2d) and weight.dim() == 4 and weight.shape[2] * weight.shape[3] >= 9


def _unstructured_cost(layer: nn.Module, weight: Tensor) -> float:
    if _is_stem(layer, weight):
        rate = STEM_EFFICIENCY
    elif _is_spatial(layer, weight):
        rate = SPATIAL_EFFICIENCY
    else:
        rate = UNSTRUCTURED_EFFICIENCY
    return _density(weight) / rate


def _structured_cost(layer: nn.Module, weight: Tensor) -> Optional[float]:
    block = block_density(layer, weight)
    return None if block is None else block / STRUCTURED_EFFICIENCY


LAYOUTS: Dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    """Add ``layout`` (or replace the one with its name); returns it."""
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a Layout, got {type(layout).__name__}")
    if layout.name in ("auto",):
        raise ValueError(f"layout name {layout.name!r} is reserved")
    LAYOUTS[layout.name] = layout
    return layout


# Order matters for ties: the first cheapest wins, so a fully dense stem stays a vendor conv.
register_layout(Layout("dense", nn.Conv2d, nn.Linear, lambda layer, weight: 1.0))
register_layout(Layout("unstructured", SparseConv2d, SparseLinear, _unstructured_cost))
register_layout(Layout("filter", ChannelSparseConv2d, None, _structured_cost))


def layer_classes() -> Tuple[type, ...]:
    """Every converted (non-dense) layer class of the registered layouts."""
    out = []
    for layout in LAYOUTS.values():
        if layout.name == "dense":
            continue
        for cls in (layout.conv, layout.linear):
            if cls is not None and cls not in out:
                out.append(cls)
    return tuple(out)


LAYOUT_ALIASES = {"structured": "filter"}
"""Older layout names still accepted (saved models of version 0.2 name the filter layout "structured")."""


def normalize_layout(name: str, argument: str = "layout") -> str:
    """The registered layout called ``name`` (or ``"auto"``), resolving older aliases; a ValueError
    naming ``argument`` for anything else."""
    canonical = LAYOUT_ALIASES.get(name, name) if isinstance(name, str) else name
    if canonical != "auto" and canonical not in LAYOUTS:
        raise ValueError(f"{argument} must be one of {('auto', *LAYOUTS)}, got {name!r}")
    return canonical


def layout_of(layer: nn.Module) -> Optional[str]:
    """The layout a converted layer implements (None for anything else, plain layers included)."""
    for layout in LAYOUTS.values():
        if layout.name != "dense" and type(layer) in (layout.conv, layout.linear):
            return layout.name
    return None
