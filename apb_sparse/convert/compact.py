"""Physical channel removal: ``compact(model)`` returns a smaller dense model with the same outputs.

The model is traced with ``torch.fx``; every tensor gets a *channel space* (dim 1 of a 4-D tensor,
the features of a 2-D one).  Element-wise ops and BatchNorm keep the space, a convolution or a
linear layer starts a new one, and a residual add joins the spaces of its operands (union-find),
so tensors summed together always lose the same channels.  Inputs, outputs and any op we do not
understand pin their spaces (nothing removed there), which keeps the transform safe on any model.

A channel ``c`` of a space is removed when either
  * it is identically zero: every conv / linear writing into the space has a zero filter ``c``
    (and zero bias), and every BatchNorm in the space maps 0 to 0 on ``c``; or
  * nobody reads it: every conv / linear reading the space has zero weights on input channel ``c``.
Only eval-mode (running-statistics) BatchNorm semantics are preserved.
"""
from __future__ import annotations

import operator
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..nn.masked import MaskedConv2d
from .fuse import ZERO_PRESERVING, batchnorm_tail
from .fuse import trace as _fx_trace
from .sparsify import bake_torch_prune, densify

__all__ = ["compact", "channel_groups", "zero_dead_batchnorm"]

# Ops that keep channel c in channel c and map a zero channel to zero (sigmoid does not: a removed
# all-zero channel would have read 0.5 downstream, so it pins its input).
_PASS_MODULES = ZERO_PRESERVING + (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, torch.tanh,
                   F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_PASS_METHODS = {"relu", "relu_", "contiguous", "tanh", "clone"}


def _zero_preserving(m: nn.Module) -> bool:
    return isinstance(m, ZERO_PRESERVING) or (isinstance(m, nn.Sequential) and all(map(_zero_preserving, m)))
_JOIN = {operator.add, operator.iadd, torch.add, operator.sub, torch.sub, operator.mul, torch.mul}


class _UnionFind:
    def __init__(self):
        self.parent: List[int] = []
        self.pinned: List[bool] = []

    def new(self, pinned: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.pinned.append(pinned)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            self.pinned[a] = self.pinned[a] or self.pinned[b]
        return a

    def pin(self, a: int) -> None:
        self.pinned[self.find(a)] = True


class _Graph:
    """Channel spaces and the layers attached to them."""

    def __init__(self, model: nn.Module, example: Tensor, gm: fx.GraphModule):
        self.model = model
        ShapeProp(gm).propagate(example)
        self.uf = _UnionFind()
        self.space: Dict[fx.Node, int] = {}
        # layer name -> space it writes (producers) / reads (consumers, with features per channel)
        self.producers: List[Tuple[str, int]] = []
        self.consumers: List[Tuple[str, int, int]] = []
        self.batchnorms: List[Tuple[str, int]] = []
        self.depthwise: List[Tuple[str, int]] = []
        modules = dict(model.named_modules())
        for node in gm.graph.nodes:
            self._visit(node, modules)

    def _tensor_args(self, node: fx.Node) -> List[fx.Node]:
        out = []
        for a in node.all_input_nodes:
            if a in self.space:
                out.append(a)
        return out

    def _pin_inputs(self, node: fx.Node) -> None:
        for a in self._tensor_args(node):
            self.uf.pin(self.space[a])

    @staticmethod
    def _shape(node: fx.Node) -> Optional[Tuple[int, ...]]:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def _visit(self, node: fx.Node, modules: Dict[str, nn.Module]) -> None:
        uf = self.uf
        if node.op == "placeholder":
            self.space[node] = uf.new(pinned=True)
            return
        if node.op == "output":
            self._pin_inputs(node)
            return
        if node.op == "get_attr":
            return
        shape = self._shape(node)
        if shape is None:  # not a tensor (sizes, tuples): whatever it came from must not change
            self._pin_inputs(node)
            return
        args = self._tensor_args(node)
        if node.op == "call_module":
            mod = modules[node.target]
            src = self.space.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            if isinstance(mod, nn.Conv2d) and src is not None and type(mod) is nn.Conv2d:
                if mod.groups == 1:
                    self.consumers.append((node.target, src, 1))
                    self.space[node] = uf.new()
                    self.producers.append((node.target, self.space[node]))
                    return
                if mod.groups == mod.in_channels == mod.out_channels:
                    self.space[node] = src  # depthwise: channel c stays channel c
                    self.depthwise.append((node.target, src))
                    return
            if type(mod) is nn.Linear and src is not None:
                in_shape = self._shape(node.args[0])
                per = 1
                if in_shape is not None and len(in_shape) == 2 and node.args[0] in self._flat_from:
                    per = self._flat_from[node.args[0]]
                self.consumers.append((node.target, src, per))
                self.space[node] = uf.new()
                self.producers.append((node.target, self.space[node]))
                return
            tail = batchnorm_tail(mod)
            if src is not None and len(args) == 1 and tail is not None and _zero_preserving(tail):
                # BatchNorm2d, or BatchNorm + a zero-preserving activation (timm's BatchNormAct2d)
                self.space[node] = src
                self.batchnorms.append((node.target, src))
                return
            if isinstance(mod, _PASS_MODULES) and src is not None and len(args) == 1:
                self.space[node] = src
                return
            if isinstance(mod, nn.Flatten) and src is not None:
                return self._flatten(node, src)
        elif node.op == "call_function":
            if node.target in _PASS_FUNCTIONS and len(args) == 1 and node.args[0] is args[0]:
                self.space[node] = self.space[args[0]]
                return
            if node.target in _JOIN and args:
                shapes = [self._shape(a) for a in args]
                if all(s == shape for s in shapes):
                    root = self.space[args[0]]
                    for a in args[1:]:
                        root = uf.union(root, self.space[a])
                    self.space[node] = root
                    return
            if node.target is torch.flatten and len(args) == 1:
                return self._flatten(node, self.space[args[0]])
        elif node.op == "call_method":
            if node.target in _PASS_METHODS and len(args) == 1:
                self.space[node] = self.space[args[0]]
                return
            if node.target in ("view", "reshape", "flatten") and len(args) == 1 and len(shape) == 2:
                return self._flatten(node, self.space[args[0]])
        # Anything else: keep every channel it touches.
        self._pin_inputs(node)
        self.space[node] = uf.new(pinned=True)

    @property
    def _flat_from(self) -> Dict[fx.Node, int]:
        if not hasattr(self, "_flat"):
            self._flat = {}
        return self._flat

    def _flatten(self, node: fx.Node, src: int) -> None:
        in_shape = self._shape(node.args[0])
        out_shape = self._shape(node)
        if in_shape is None or len(in_shape) != 4 or out_shape is None or len(out_shape) != 2 or \
                out_shape[1] != in_shape[1] * in_shape[2] * in_shape[3]:
            self.uf.pin(src)
            self.space[node] = self.uf.new(pinned=True)
            return
        self.space[node] = src
        self._flat_from[node] = in_shape[2] * in_shape[3]


def _default_example(model: nn.Module) -> List[Tensor]:
    p = next(iter(model.parameters()), None)
    if p is None:
        p = next(iter(model.buffers()), torch.zeros(()))
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    c = first.in_channels if first is not None else 3
    return [torch.zeros(1, c, s, s, dtype=p.dtype, device=p.device) for s in (32, 28, 8)]


def channel_groups(model: nn.Module, example_input: Optional[Tensor] = None) -> List[dict]:
    """The prunable channel groups of ``model`` (for inspection): each entry lists the layers that
    write into, normalise and read from one joined channel space, and whether it is pinned."""
    g = _build(model, example_input)
    groups: Dict[int, dict] = {}

    def entry(s):
        r = g.uf.find(s)
        return groups.setdefault(r, {"pinned": g.uf.pinned[r], "producers": [], "batchnorms": [],
                                     "consumers": [], "depthwise": []})
    for name, s in g.producers:
        entry(s)["producers"].append(name)
    for name, s in g.batchnorms:
        entry(s)["batchnorms"].append(name)
    for name, s, _ in g.consumers:
        entry(s)["consumers"].append(name)
    for name, s in g.depthwise:
        entry(s)["depthwise"].append(name)
    return list(groups.values())


class UntraceableModelError(ValueError):
    """``torch.fx`` cannot trace the model (data-dependent control flow, ...)."""


def _build(model: nn.Module, example_input: Optional[Tensor]) -> _Graph:
    try:
        gm = _fx_trace(model)
    except Exception as e:
        raise UntraceableModelError(f"torch.fx cannot trace the model ({type(e).__name__}: "
                                    f"{' '.join(str(e).split())}), so its channel groups are unknown") from None
    was_training = model.training
    model.eval()
    try:
        if example_input is not None:
            return _Graph(model, example_input, gm)
        errors = []
        for ex in _default_example(model):
            try:
                return _Graph(model, ex, gm)
            except Exception as exc:  # wrong default size: try the next one
                errors.append(str(exc))
        raise ValueError("could not run the model on a default example input; pass example_input. "
                         f"Errors: {errors}")
    finally:
        model.train(was_training)


@torch.no_grad()
def compact(model: nn.Module, example_input: Optional[Tensor] = None, *, inplace: bool = False) -> nn.Module:
    """Physically remove removable channels (see the module docstring) and return the smaller model.

    Args:
        model: a dense, masked or sparse model (sparse and masked layers are densified first,
            fusions undone: see :func:`~apb_sparse.densify`; ``torch.nn.utils.prune`` masks are
            made permanent).  Layers the trace does not
            understand (subclasses with their own ``forward``, attention blocks) keep their
            channels; padding modes and ``padding="same"`` are kept.
        example_input: an input the model accepts (shapes are traced with it); by default
            zero images of 32x32, 28x28 then 8x8 pixels are tried.
        inplace: reuse ``model``'s modules instead of a deep copy.

    Returns:
        A model of plain layers; ``model.apb_compact_removed`` maps each channel group (its first
        producer layer) to the number of channels removed.  A model ``torch.fx`` cannot trace
        comes back densified with nothing removed, and a warning says why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model = bake_torch_prune(densify(model, inplace=inplace))
    try:
        g = _build(model, example_input)
    except UntraceableModelError as e:
        # Nothing is provably removable: the (densified) model is the correct answer.
        warnings.warn(f"compact: {e}; no channel removed", stacklevel=2)
        model.apb_compact_removed = {}
        return model
    mods = dict(model.named_modules())
    spaces: Dict[int, dict] = {}
    for name, s in g.producers:
        spaces.setdefault(g.uf.find(s), {"p": [], "b": [], "c": [], "d": []})["p"].append(name)
    for name, s in g.batchnorms:
        spaces.setdefault(g.uf.find(s), {"p": [], "b": [], "c": [], "d": []})["b"].append(name)
    for name, s, per in g.consumers:
        spaces.setdefault(g.uf.find(s), {"p": [], "b": [], "c": [], "d": []})["c"].append((name, per))
    for name, s in g.depthwise:
        spaces.setdefault(g.uf.find(s), {"p": [], "b": [], "c": [], "d": []})["d"].append(name)
    removed = {}
    for root, members in spaces.items():
        if g.uf.pinned[root] or not members["p"]:
            continue
        n_ch = _channels_of(mods[members["p"][0]])
        if n_ch == 0:  # a zero-size layer: nothing to remove
            continue
        zero_out = torch.ones(n_ch, dtype=torch.bool)
        for name in members["p"]:
            m = mods[name]
            zero_out &= (m.weight.flatten(1) == 0).all(1).cpu()
            if m.bias is not None:
                zero_out &= (m.bias == 0).cpu()
        for name in members["b"] + members["d"]:
            zero_out &= _maps_zero_to_zero(mods[name])
        unread = torch.ones(n_ch, dtype=torch.bool)
        for name, per in members["c"]:
            w = mods[name].weight
            if isinstance(mods[name], nn.Linear):
                unread &= (w.reshape(w.shape[0], n_ch, per) == 0).all(2).all(0).cpu()
            else:
                unread &= (w.transpose(0, 1).flatten(1) == 0).all(1).cpu()
        drop = zero_out | unread
        if bool(drop.all()):
            drop[0] = False  # keep one channel: zero-width tensors are not supported by every op
        if not bool(drop.any()):
            continue
        keep = (~drop).nonzero().flatten()
        for name in members["p"]:
            _slice_out(mods[name], keep)
        for name in members["b"]:
            _slice_bn(mods[name], keep)
        for name in members["d"]:
            _slice_depthwise(mods[name], keep)
        for name, per in members["c"]:
            _slice_in(mods[name], keep, per, n_ch)
        removed[members["p"][0]] = int(drop.sum())
    model.apb_compact_removed = removed
    return model


def _channels_of(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def _maps_zero_to_zero(layer: nn.Module) -> Tensor:
    if isinstance(layer, nn.BatchNorm2d):
        w = layer.weight if layer.weight is not None else torch.ones_like(layer.running_mean)
        b = layer.bias if layer.bias is not None else torch.zeros_like(layer.running_mean)
        out = b - layer.running_mean * w / torch.sqrt(layer.running_var + layer.eps)
        return (out == 0).cpu()
    # depthwise conv: a zero input channel gives its bias
    return (layer.bias == 0).cpu() if layer.bias is not None else torch.ones(layer.out_channels, dtype=torch.bool)


def _slice_out(layer: nn.Module, keep: Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight[keep].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias[keep].clone())
    if isinstance(layer, nn.Conv2d):
        layer.out_channels = keep.numel()
    else:
        layer.out_features = keep.numel()


def _slice_in(layer: nn.Module, keep: Tensor, per: int, n_ch: int) -> None:
    if isinstance(layer, nn.Conv2d):
        layer.weight = nn.Parameter(layer.weight[:, keep].clone())
        layer.in_channels = keep.numel()
    else:
        idx = (keep[:, None] * per + torch.arange(per, device=keep.device)[None, :]).flatten()
        layer.weight = nn.Parameter(layer.weight[:, idx].clone())
        layer.in_features = idx.numel()


def _slice_bn(bn: nn.BatchNorm2d, keep: Tensor) -> None:
    if bn.weight is not None:
        bn.weight = nn.Parameter(bn.weight[keep].clone())
        bn.bias = nn.Parameter(bn.bias[keep].clone())
    bn.running_mean = bn.running_mean[keep].clone()
    bn.running_var = bn.running_var[keep].clone()
    bn.num_features = keep.numel()


def _slice_depthwise(conv: nn.Conv2d, keep: Tensor) -> None:
    _slice_out(conv, keep)
    conv.in_channels = conv.groups = keep.numel()


@torch.no_grad()
def zero_dead_batchnorm(model: nn.Module) -> List[str]:
    """Zero the BatchNorm weight and bias of channels whose producing conv filter is entirely zero.

    Filter pruning removes a channel; a BatchNorm that follows the pruned filter would otherwise
    turn its zeros into a constant (its shift), which is neither the pruned network nor removable
    by :func:`compact`.  Applies to BatchNorm2d layers fed directly by an ``nn.Conv2d`` (masked
    layers included).  Returns the names of the BatchNorm layers changed.
    """
    gm = _fx_trace(model)
    mods = dict(model.named_modules())
    changed = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(mods[src.target], nn.Conv2d)):
            continue
        conv, bn = mods[src.target], mods[node.target]
        w = conv.weight * conv.get_mask() if isinstance(conv, MaskedConv2d) else conv.weight
        dead = (w.flatten(1) == 0).all(1)
        if conv.bias is not None:
            dead &= conv.bias == 0
        if bool(dead.any()) and bn.weight is not None:
            bn.weight[dead] = 0
            bn.bias[dead] = 0
            bn.running_mean[dead] = 0
            changed.append(node.target)
    return changed
