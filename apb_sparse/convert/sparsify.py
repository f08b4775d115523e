"""Model conversion: masks -> sparse deployment layers (:func:`sparsify`) and back (:func:`densify`).

``sparsify`` picks, per layer, the cheapest of three layouts by an expected-cost model:

* ``"dense"``: keep ``nn.Conv2d`` / ``nn.Linear`` (vendor kernel) on ``weight * mask``;
* ``"unstructured"``: :class:`~apb_sparse.nn.SparseConv2d` / :class:`~apb_sparse.nn.SparseLinear`
  (CSR nonzeros, the row-gather kernel);
* ``"filter"``: :class:`~apb_sparse.nn.ChannelSparseConv2d` (dense block of the kept filters
  and input channels; called ``"structured"`` in version 0.2, a name still accepted).

Costs are relative to the dense layer: dense = 1, unstructured = density / SPATIAL_EFFICIENCY for
convs with a kernel of at least 3x3 and density / UNSTRUCTURED_EFFICIENCY for 1x1 convs and linear
layers, filter = kept-block density / STRUCTURED_EFFICIENCY.  The efficiencies are the rate at which
each layout does its useful multiply-adds compared with the dense vendor kernel; they were measured
with ``benchmarks/latency.py --per-layer`` on the 2-core AVX2 development machine.  Stem convs
(at most STEM_TAPS taps per filter: 1- or 3-channel images) use STEM_EFFICIENCY = 1: the vendor
kernel has no input channels to block over there and our kernel measured as fast or faster even
fully dense (0.7-1.25x without the lanes layout, 7-10x with it on 8x8 digits at batch 256).

A layer ``sparsify`` cannot convert without changing what the model computes is left exactly as
it is, and its :class:`LayerChoice` says why (``reason``): subclasses of ``nn.Conv2d`` /
``nn.Linear`` that override ``forward`` (weight standardisation, ...) unless a converter is
registered for them with :func:`register_converter`; linear layers whose parent reads their
``weight`` directly (``nn.MultiheadAttention.out_proj``, the fast path of
``nn.TransformerEncoderLayer``); zero-size layers; and layers whose dtype, padding or
``padding_mode`` the sparse layers do not take (they stay plain dense layers).

Why one file of ~530 lines: conversion (converter registry, per-layer choice, build, replace) and
its inverse :func:`densify` share the same private helpers (``_prunable``, ``_effective_weight``,
``_replace``); the sparsity report lives in :mod:`.report`.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import prune

from ..nn.masked import MaskedConv2d, MaskedLayer, MaskedLinear
from ..nn.pool import MaxPool2x2
from ..nn.sparse import SparseLinear
from .deployed import DeployedModel
from .fuse import fold_batchnorm, fuse_activations, unfuse
from .layouts import (LAYOUTS, SPATIAL_EFFICIENCY, STEM_EFFICIENCY, STEM_TAPS, STRUCTURED_EFFICIENCY, UNSTRUCTURED_EFFICIENCY,
                      block_density, layer_classes, normalize_layout)

__all__ = ["sparsify", "densify", "sparsity_report", "SparsityReport", "LayerReport", "LayerChoice",
           "bake_torch_prune", "register_converter", "unregister_converter", "PATHS",
           "UNSTRUCTURED_EFFICIENCY", "SPATIAL_EFFICIENCY", "STRUCTURED_EFFICIENCY", "STEM_TAPS", "STEM_EFFICIENCY"]

PATHS = ("auto", *LAYOUTS)
"""The built-in layout names (``"auto"`` and the layouts registered in :mod:`.layouts` at import); the
version-0.2 name of this tuple, kept."""
SPARSE_LAYERS = layer_classes()


@dataclass
class LayerChoice:
    """Why ``sparsify`` chose a layer's layout: densities and the expected relative costs.

    ``reason`` is set when the layer could not take the layout the cost model (or the caller) asked
    for: it then stays dense (``layout == "dense"``), either as a plain dense layer or, for layers
    ``sparsify`` does not convert at all (see the module docstring), exactly as it was.
    ``measured_ms`` holds ``{layout: ms per call}`` when ``deploy(..., tune=True)`` timed the
    layer's candidate layouts (and chose the fastest).
    """

    layout: str
    density: float
    block_density: Optional[float]
    cost: Dict[str, float] = field(default_factory=dict)
    reason: Optional[str] = None
    measured_ms: Dict[str, float] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """Deprecated name of :attr:`layout` (version 0.2)."""
        warnings.warn("LayerChoice.path is renamed LayerChoice.layout", DeprecationWarning, stacklevel=2)
        return self.layout


# ----------------------------------------------------------------------------------------------
# Which layers convert, and how

Converter = Callable[[nn.Module], nn.Module]
_CONVERTERS: Dict[type, Converter] = {}

# Parents that read their children's ``weight`` tensors directly instead of calling them, so a
# child replaced by a sparse layer (which has no ``weight``) would break them.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def register_converter(cls: type, fn: Optional[Converter] = None):
    """Tell :func:`sparsify` how to convert a subclass of ``nn.Conv2d`` / ``nn.Linear`` whose
    ``forward`` differs from its base class's.

    By default such a layer is left exactly as it is (its own ``forward`` may standardise the
    weight, add noise, quantise, ...; a plain sparse layer would compute something else), and its
    :class:`LayerChoice` records why.  A converter returns a plain ``nn.Conv2d`` / ``nn.Linear``
    computing the same function as ``layer`` in eval mode, which ``sparsify`` then converts like
    any dense layer; e.g. for a weight-standardised conv, an ``nn.Conv2d`` holding the
    standardised weight.  Masks given to ``sparsify`` for such a layer apply to the returned
    layer's weight (which must have the layer's weight shape).

    Usable as a decorator::

        @register_converter(WSConv2d)
        def _(layer):
            conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                             layer.padding, layer.dilation, layer.groups, layer.bias is not None)
            conv.weight.data.copy_(layer.standardized_weight())
            ...
            return conv

    Args:
        cls: the layer class (subclasses of it use the same converter unless they register their own).
        fn: ``fn(layer) -> nn.Conv2d | nn.Linear``; ``None`` as a decorator.

    Returns:
        ``fn`` (or the decorator).
    """
    if not isinstance(cls, type) or not issubclass(cls, (nn.Conv2d, nn.Linear)):
        raise TypeError(f"cls must be a subclass of nn.Conv2d or nn.Linear, got {cls!r}")
    if fn is None:
        def decorator(f: Converter) -> Converter:
            return register_converter(cls, f)
        return decorator
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _CONVERTERS[cls] = fn
    return fn


def unregister_converter(cls: type) -> None:
    """Remove the converter registered for ``cls`` (no error if there is none)."""
    _CONVERTERS.pop(cls, None)


def _converter_for(layer: nn.Module) -> Optional[Converter]:
    for klass in type(layer).__mro__:
        if klass in _CONVERTERS:
            return _CONVERTERS[klass]
    return None


def _standard_forward(layer: nn.Module) -> bool:
    """True when ``layer`` computes what its library base class computes (only the class differs,
    e.g. a parametrized layer, a subclass adding attributes, or a masked layer)."""
    t = type(layer)
    if isinstance(layer, MaskedConv2d):
        return t.forward is MaskedConv2d.forward
    if isinstance(layer, MaskedLinear):
        return t.forward is MaskedLinear.forward
    if isinstance(layer, nn.Conv2d):
        return t.forward is nn.Conv2d.forward and t._conv_forward is nn.Conv2d._conv_forward
    return t.forward is nn.Linear.forward


def _left_as_is(name: str, layer: nn.Module, parents: Mapping[str, nn.Module]) -> Optional[str]:
    """Why ``layer`` must not be replaced at all (None when it may be)."""
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return "uninitialised lazy layer (run the model once first)"
    parent = parents.get(name)
    if isinstance(parent, _READS_CHILD_WEIGHTS):
        return (f"its parent {type(parent).__name__} reads its weight directly instead of calling it, "
                "so a sparse layer cannot stand in for it")
    if not _standard_forward(layer) and _converter_for(layer) is None:
        return (f"{type(layer).__name__} overrides forward: it may not compute a plain "
                f"{'convolution' if isinstance(layer, nn.Conv2d) else 'linear map'} of its weight "
                "(use apb_sparse.sparsify.register_converter to convert it)")
    return None


def _source(name: str, layer: nn.Module) -> nn.Module:
    """The layer whose weight ``sparsify`` converts: ``layer``, or its registered converter's result."""
    fn = _converter_for(layer) if not _standard_forward(layer) else None
    if fn is None:
        return layer
    out = fn(layer)
    kind = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear
    if type(out) is not kind:
        raise TypeError(f"the converter registered for {type(layer).__name__} ({name!r}) must return a plain "
                        f"{kind.__name__}, got {type(out).__name__}")
    if tuple(out.weight.shape) != tuple(layer.weight.shape):
        raise ValueError(f"the converter registered for {type(layer).__name__} ({name!r}) returned a weight of "
                         f"shape {tuple(out.weight.shape)}, expected the layer's {tuple(layer.weight.shape)}")
    out.train(layer.training)
    return out


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


def _choose(layer: nn.Module, weight: Tensor, layout: str) -> LayerChoice:
    """The cheapest registered layout for ``layer`` (``layout="auto"``), or the one asked for."""
    density = float(weight.count_nonzero()) / max(1, weight.numel())
    cost = {}
    for name, candidate in LAYOUTS.items():
        if candidate.layer_class(layer) is not None:
            c = candidate.cost(layer, weight)
            if c is not None:
                cost[name] = float(c)
    if layout == "auto":
        chosen = min(cost, key=cost.get)  # ties: the first registered (dense)
    elif layout in cost:
        chosen = layout
    else:
        chosen = "unstructured"  # the filter layout requested on a layer that cannot take it
    return LayerChoice(chosen, density, block_density(layer, weight), cost)


def _explicit_padding(conv: nn.Conv2d) -> Optional[Tuple[int, int]]:
    """``conv.padding`` as two integers; None for a ``padding="same"`` that pads one side more
    (an even effective kernel size), which symmetric padding cannot express."""
    if not isinstance(conv.padding, str):
        return tuple(int(p) for p in conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]  # "same" (stride 1)
    if any(t % 2 for t in total):
        return None
    return tuple(t // 2 for t in total)


_PROBED: Dict[Tuple[type, torch.dtype, str], Optional[str]] = {}


def _kernel_refuses(cls: type, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Why the sparse layer ``cls`` cannot run ``dtype`` on ``device`` (None when it can).

    Found by running a 1x1 layer once per (class, dtype, device type): whether half precision is
    computed depends on the compiled kernels, and asking them is the only reliable check.
    """
    key = (cls, dtype, device.type)
    if key not in _PROBED:
        try:
            with torch.no_grad():
                if cls is SparseLinear:
                    layer = cls.from_dense(nn.Linear(1, 1, device=device, dtype=dtype))
                    x = torch.ones(1, 1, device=device, dtype=dtype)
                else:
                    layer = cls.from_dense(nn.Conv2d(1, 1, 1, device=device, dtype=dtype))
                    x = torch.ones(1, 1, 1, 1, device=device, dtype=dtype)
                out = layer(x)
            if out.dtype != dtype:
                raise TypeError(f"returned {out.dtype}")
            _PROBED[key] = None
        except Exception as e:  # any refusal (TypeError, RuntimeError, missing extension) counts
            _PROBED[key] = f"{cls.__name__} does not run {dtype} on {device.type}: {type(e).__name__}: {e}"
    return _PROBED[key]


def _build_sparse(layer: nn.Module, weight: Tensor, layout: str) -> Tuple[Optional[nn.Module], Optional[str]]:
    """``(sparse layer, None)`` for ``layout``, or ``(None, why not)``."""
    is_conv = isinstance(layer, nn.Conv2d)
    cls = LAYOUTS[layout].layer_class(layer)
    if cls is None:
        return None, f"the {layout} layout has no {'convolution' if is_conv else 'linear'} layer"
    if weight.numel() == 0:
        return None, "zero-size layer: nothing to sparsify"
    refused = _kernel_refuses(cls, weight.dtype, weight.device)
    if refused:
        return None, refused
    # The layer as it is first; a padding="same" / "valid" the sparse layer refuses is retried
    # as the equivalent explicit padding when there is one.
    attempts = [_plain(layer, weight)]
    explicit = _explicit_padding(layer) if is_conv else None
    if is_conv and isinstance(layer.padding, str) and explicit is not None:
        attempts.append(_plain(layer, weight))
        attempts[-1].padding = explicit
    new, error = None, None
    for src in attempts:
        try:
            new = cls.from_dense(src)
            break
        except (ValueError, TypeError, RuntimeError) as e:
            error = e
    if new is None:
        if is_conv and explicit is None:
            return None, (f"padding={layer.padding!r} with kernel_size={tuple(layer.kernel_size)} and dilation="
                          f"{tuple(layer.dilation)} pads one side more than the other, which {cls.__name__} "
                          f"refuses: {error}")
        return None, f"{cls.__name__} refuses the layer: {error}"
    # A sparse layer that does not keep the padding mode would silently pad with zeros.
    mode = getattr(layer, "padding_mode", "zeros")
    if getattr(new, "padding_mode", "zeros") != mode:
        return None, f"{cls.__name__} does not support padding_mode={mode!r}"
    new.train(layer.training)
    return new, None


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


def _parents(model: nn.Module) -> Dict[str, nn.Module]:
    out = {}
    for pname, parent in model.named_modules():
        for cname, _ in parent.named_children():
            out[f"{pname}.{cname}" if pname else cname] = parent
    return out


def bake_torch_prune(model: nn.Module) -> nn.Module:
    """Make ``torch.nn.utils.prune`` reparametrisations permanent, in place: each pruned
    ``weight_orig`` * ``weight_mask`` becomes a plain ``weight`` with the zeros (what
    ``prune.remove`` does), so the conversion sees the zeros and no forward pre-hook is left.
    Returns ``model``."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                names = [h._tensor_name for h in getattr(hook, "_pruning_methods", [hook])] \
                    if isinstance(hook, prune.PruningContainer) else [hook._tensor_name]
                for name in dict.fromkeys(names):
                    if hasattr(module, name + "_orig"):
                        prune.remove(module, name)
    return model


@torch.no_grad()
def _mask_in_place(layer: nn.Module, mask: Tensor) -> None:
    """What :func:`apply_masks` does to a layer, for layers that stay as they are."""
    if isinstance(layer, MaskedLayer):
        layer.set_mask(mask)
        return
    if tuple(mask.shape) != tuple(layer.weight.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the weight's shape "
                         f"{tuple(layer.weight.shape)}")
    layer.weight.mul_(mask.to(device=layer.weight.device, dtype=layer.weight.dtype))


def sparsify(model: nn.Module, masks: Optional[Mapping[str, Tensor]] = None, *, inplace: bool = False,
             layout: Union[str, Mapping[str, str]] = "auto", fuse: Union[bool, str] = False,
             calibrate: Optional[Tensor] = None, calibrate_rounds: int = 5,
             path: Union[str, Mapping[str, str], None] = None) -> nn.Module:
    """Replace each ``nn.Conv2d`` / ``nn.Linear`` (masked ones included) by its sparse counterpart.

    Layers that cannot be converted without changing the model's function are left as they are,
    with the reason in ``model.apb_sparse_choices`` (see the module docstring): subclasses that
    override ``forward`` (unless :func:`register_converter` says how to convert them), the
    projections of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``, and uninitialised
    lazy layers.  Their masks, if given, are applied to their weight in place, as
    :func:`apply_masks` does.  Zero-size layers, and layers whose dtype, ``padding``
    (``"same"`` padding one side more) or ``padding_mode`` the sparse layers refuse, become plain
    dense layers, again with the reason recorded.

    Args:
        model: any model; dense layers with zeros (checkpoints of any pruning tool) work directly.
        masks: optional ``{module name: 0/1 tensor shaped like its weight}``; else the masks of
            masked layers and the zeros already in the weights are used.
        inplace: modify ``model`` instead of a deep copy.
        layout: ``"auto"`` (per-layer choice by expected cost), or force ``"dense"``,
            ``"unstructured"`` or ``"filter"`` (layers that cannot take the filter layout,
            grouped convs and linear layers, use the unstructured one); or a mapping
            ``{layer name: layout}`` (e.g. the layouts of a saved model, to rebuild it before
            ``load_state_dict``; layers not named use ``"auto"``).  ``"structured"`` is the
            version-0.2 name of ``"filter"`` and still accepted.
        fuse: deprecated. ``False`` (default): layers are swapped and nothing else; the model
            keeps its own forward.  For inference speed use :func:`apb_sparse.deploy`, which
            returns a frozen snapshot (BatchNorms folded, ReLU / residual add fused).  ``True``
            still returns the older folded ``fx.GraphModule`` with a ``DeprecationWarning``;
            ``"auto"`` (the old default: a fused forward with caches that guessed when the model
            changed, wrong after in-place updates) now warns and behaves as ``False``.
        path: deprecated name of ``layout`` (version 0.2); warns.
        calibrate, calibrate_rounds: deprecated and ignored with a warning (per-layer timing on
            a loaded machine chose worse paths than the cost model); the analytic cost model
            decides.

    Returns:
        The converted model.  ``model.apb_sparse_choices`` maps each conv / linear layer's name
        to a :class:`LayerChoice` (layout, densities, expected costs, and why a layer stayed dense).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if path is not None:
        warnings.warn("sparsify(path=...) is renamed sparsify(layout=...)", FutureWarning, stacklevel=2)
        layout = path
    per_layer, default = _layout_argument(layout)
    layers = _prunable(model)
    unknown_layers = sorted(set(per_layer) - {n for n, _ in layers})
    if unknown_layers:
        raise ValueError(f"layout names layers that are not Conv2d/Linear layers of the model: {unknown_layers}")
    masks = dict(masks or {})
    unknown = sorted(set(masks) - {n for n, _ in layers})
    if unknown:
        raise ValueError(f"masks has keys that are not Conv2d/Linear layers of the model: {unknown}")
    if fuse not in (True, False, "auto"):
        raise ValueError(f"fuse must be True, False or 'auto', got {fuse!r}")
    if fuse == "auto" and fuse is not True:
        warnings.warn("sparsify(fuse='auto') is gone: sparsify keeps the model's own forward; for speed use "
                      "apb_sparse.deploy(model, example_input)", FutureWarning, stacklevel=2)
        fuse = False
    elif fuse is True:
        warnings.warn("sparsify(fuse=True) is deprecated: use apb_sparse.deploy(model, example_input), the "
                      "deployment snapshot every benchmark times", DeprecationWarning, stacklevel=2)
    if calibrate is not None:
        warnings.warn("sparsify(calibrate=...) is deprecated and ignored: the analytic cost model chooses "
                      "each layer's layout", DeprecationWarning, stacklevel=2)
        calibrate = None
    if not inplace:
        model = copy.deepcopy(model)
    model = bake_torch_prune(model)
    skipped_fusions: Dict[str, str] = {}
    if fuse is True:
        model = fold_batchnorm(model, inplace=True)
        skipped_fusions.update(getattr(model, "apb_fuse_skipped", {}))
    layers = _prunable(model)
    parents = _parents(model)
    choices: Dict[str, LayerChoice] = {}
    convertible = []
    for name, layer in layers:
        why = _left_as_is(name, layer, parents)
        if why is None:
            convertible.append((name, layer, _source(name, layer)))
            continue
        if name in masks:
            _mask_in_place(layer, masks[name])
        weight = _effective_weight(layer, None)
        # A layer whose forward transforms its weight (weight standardisation) computes with a
        # dense weight whatever zeros the stored one has: it is reported dense.
        density = 1.0 if not _standard_forward(layer) else float(weight.count_nonzero()) / max(1, weight.numel())
        choices[name] = LayerChoice("dense", density, None, {}, reason=why)
    for name, layer, source in convertible:
        weight = _effective_weight(source, masks.get(name))
        choice = _choose(source, weight, per_layer.get(name, default))
        new = None
        if choice.layout != "dense":
            new, why = _build_sparse(source, weight, choice.layout)
            if new is None:
                choice.reason = f"{choice.layout} layout unavailable: {why}"
                choice.layout = "dense"
        model = _replace(model, name, new if new is not None else _plain(source, weight))
        choices[name] = choice
    if fuse is True:
        model = fuse_activations(model)
        skipped_fusions.update(getattr(model, "apb_fuse_skipped", {}))
        model.apb_fuse_skipped = skipped_fusions
    model.apb_sparse_choices = {n: choices[n] for n, _ in layers if n in choices}
    return model


def _layout_argument(layout: Union[str, Mapping[str, str]]) -> Tuple[Dict[str, str], str]:
    """``(per-layer layouts, default layout)`` of a ``layout`` argument, names checked and aliases
    resolved."""
    if isinstance(layout, Mapping):
        return {name: normalize_layout(v, "layout") for name, v in layout.items()}, "auto"
    return {}, normalize_layout(layout, "layout")


def _restore_padding_mode(dense: nn.Module, layer: nn.Module) -> nn.Module:
    # to_dense of a layer that pads with reflect / replicate / circular must not pad with zeros.
    mode = getattr(layer, "padding_mode", "zeros")
    if isinstance(dense, nn.Conv2d) and dense.padding_mode != mode:
        dense.padding_mode = mode  # nn.Conv2d keeps the padding it needs for every mode
    return dense


def densify(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Equivalent model with plain ``nn.Conv2d`` / ``nn.Linear`` layers (sparse and masked layers
    become dense layers holding their effective weights).

    Fusions are undone first (:func:`apb_sparse.fuse.unfuse`): in a fused ``fx.GraphModule`` the
    ReLU, residual add and max pool go back into the graph.  A sparse conv with ``fused_relu`` (or
    ``fused_pool``) set outside such a graph becomes ``nn.Sequential(conv, nn.ReLU())`` (followed by
    ``nn.MaxPool2d(2, 2)``).  A :class:`~apb_sparse.DeployedModel`
    gives its converted model, densified (BatchNorms stay folded).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, DeployedModel):  # the snapshot's converted model, without the wrapper
        model = model.module
    if not inplace:
        model = copy.deepcopy(model)
    for sub in list(model.modules()):
        if isinstance(sub, fx.GraphModule):
            unfuse(sub)
    for name, layer in list(model.named_modules()):
        if isinstance(layer, MaxPool2x2):
            model = _replace(model, name, nn.MaxPool2d(2, 2))
            continue
        if isinstance(layer, SPARSE_LAYERS + MaskedLayer):
            dense = _restore_padding_mode(layer.to_dense(), layer)
            dense.train(layer.training)
            if getattr(layer, "fused_relu", False):
                dense = nn.Sequential(dense, nn.ReLU())
            if getattr(layer, "fused_pool", False):
                dense = nn.Sequential(dense, nn.MaxPool2d(2, 2))
            model = _replace(model, name, dense)
    if hasattr(model, "apb_sparse_choices"):
        del model.apb_sparse_choices
    return model


from .report import LayerReport, SparsityReport, sparsity_report  # noqa: E402  (report needs SPARSE_LAYERS from here)


def __getattr__(name: str):
    # magnitude_masks and apply_masks live in apb_sparse.convert.masks (imported lazily: masks
    # needs compact, which needs this module).
    if name in ("magnitude_masks", "apply_masks"):
        from . import masks

        return getattr(masks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
