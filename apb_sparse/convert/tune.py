"""Measured layout choice for :func:`~apb_sparse.deploy` (``deploy(model, x, tune=True)``).

The cost model of :mod:`.layouts` prices each layout with efficiencies measured once, on one
machine (AMD EPYC Zen 3, AVX2, 2 threads).  Other CPUs, thread counts and batch sizes move the
break-even densities (a 3x3 conv broke even with the vendor conv at 60-75 % density there).  With
``tune=True``, deploy instead times every layout a layer can take, on that layer's own input
shape from the example batch, and keeps the fastest:

* the model (BatchNorms already folded) is converted once per layout (``sparsify(layout=...)``),
  so each candidate layer is exactly what ``sparsify`` would build;
* one forward of the dense conversion on the example input records every layer's input shape
  (forward pre-hooks), and each candidate is timed on a random tensor of that shape (standard
  normal values: timings do not depend on the values, except denormals, which a normal
  distribution does not produce);
* candidates are timed in interleaved rounds, each call repeated for at least ``min_time``
  seconds, and the per-call medians compared; a candidate the cost model prices at over
  ``MAX_COST_RATIO`` times the cheapest one is not timed.

What it does not see: the epilogue fusions (a ReLU or residual add moved into a sparse conv's
kernel is free there, a separate pass after a dense conv) and cache effects between layers.  A
layer the caller names in ``layout={name: ...}`` keeps its layout (``deploy`` re-times the layouts
of a model already converted by ``sparsify``).  Timing costs a few forwards of the model per
layout; the three converted copies exist only during ``deploy``.
"""
from __future__ import annotations

import copy
import warnings
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..bench.timing import interleaved_medians
from .layouts import LAYOUTS, normalize_layout

__all__ = ["measure_layouts", "time_candidates", "MAX_COST_RATIO"]


def _input_shapes(model: nn.Module, names: List[str], args: Tuple[Tensor, ...]) -> Dict[str, Tuple[torch.Size, torch.dtype]]:
    """Shape and dtype of the first positional input of each named layer in one forward on args
    (layers not called are absent)."""
    modules = dict(model.named_modules())
    seen: Dict[str, Tuple[torch.Size, torch.dtype]] = {}
    handles = []

    def hook(name):
        def record(_module, inputs):
            if inputs and isinstance(inputs[0], Tensor) and name not in seen:
                seen[name] = (inputs[0].shape, inputs[0].dtype)
        return record

    for name in names:
        handles.append(modules[name].register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return seen


def time_candidates(candidates: Mapping[str, nn.Module], x: Tensor, *, rounds: int,
                    min_time: float) -> Dict[str, float]:
    """``{layout: median ms per call}`` of each candidate layer on ``x``, timed in interleaved
    rounds (:func:`apb_sparse.bench.interleaved_medians`, one warm-up round)."""
    t = interleaved_medians({k: (lambda m=m: m(x)) for k, m in candidates.items()}, rounds=rounds, warmup=1,
                            min_time=min_time)
    return {k: v["median_s"] * 1e3 for k, v in t.items()}


# A candidate whose modelled cost is over this multiple of the cheapest one's is not timed (a
# fully dense filter layout, a dense copy of a 99 %-sparse layer): it saves time and noise.
MAX_COST_RATIO = 3.0


def measure_layouts(model: nn.Module, args: Tuple[Tensor, ...], masks: Optional[Mapping[str, Tensor]],
                    layout: Union[str, Mapping[str, str]], *, rounds: int = 3,
                    min_time: float = 0.02) -> Tuple[Dict[str, str], Dict[str, Dict[str, float]]]:
    """Per-layer layout by measured time.

    Args:
        model: the model to convert (eval mode, BatchNorms folded; not modified).
        args: the example input(s).
        masks: as ``sparsify``'s ``masks``.
        layout: ``"auto"`` or a ``{layer name: layout}`` mapping (the layers it names keep theirs;
            a layer the mapping does not name is tuned).
        rounds: interleaved timing rounds per layer.
        min_time: seconds each timed call is repeated for, per round (:func:`time_candidates`).

    Returns:
        ``(layout argument for sparsify, {layer name: {layout: median ms}})``: the measured choice of
        every timed layer merged with the layers ``layout`` names (``layout`` itself when it forces
        one layout on every layer); layers with a single candidate are left to the cost model.
    """
    from .sparsify import sparsify  # deploy -> tune -> sparsify: import at call time

    if isinstance(layout, str):
        if normalize_layout(layout, "layout") != "auto":
            return layout, {}
        fixed: Dict[str, str] = {}
    else:
        fixed = {n: v for n, v in layout.items() if normalize_layout(v, "layout") != "auto"}
    copies: Dict[str, nn.Module] = {}
    for name in LAYOUTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the caller's own conversion reports them
            copies[name] = sparsify(copy.deepcopy(model), masks, inplace=True, layout=name)
    dense = copies["dense"]
    names = [n for n, c in dense.apb_sparse_choices.items() if c.reason is None and n not in fixed]
    shapes = _input_shapes(dense, names, args)
    chosen: Dict[str, str] = {}
    measured: Dict[str, Dict[str, float]] = {}
    for name in names:
        if name not in shapes:
            continue
        cost = dense.apb_sparse_choices[name].cost
        cheapest = min(cost.values()) if cost else 0.0
        candidates: Dict[str, nn.Module] = {}
        for layout_name, converted in copies.items():
            if converted.apb_sparse_choices[name].layout != layout_name:
                continue  # this layout was not available to the layer (it fell back)
            if cost.get(layout_name, 0.0) <= MAX_COST_RATIO * cheapest:
                candidates[layout_name] = converted.get_submodule(name)
        if len(candidates) < 2:
            continue
        shape, dtype = shapes[name]
        x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
        measured[name] = time_candidates(candidates, x, rounds=rounds, min_time=min_time)
        chosen[name] = min(measured[name], key=measured[name].get)
    return {**chosen, **fixed}, measured
