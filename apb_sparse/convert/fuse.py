"""Inference-time fusions for deployed models (eval mode only).

* :func:`fold_batchnorm`: a BatchNorm2d fed only by a convolution is folded into that conv's
  weight and bias (a per-output-channel scale, so zeros stay zeros and sparsity is unchanged).
* :func:`fuse_activations`: a ReLU after a :class:`~apb_sparse.nn.SparseConv2d`, and a residual
  ``add`` (+ ReLU) after one, move into the sparse kernel's epilogue, saving one pass over the
  activation each; at high sparsity those passes cost as much as the convolution itself.
* :func:`fuse_pools`: a 2x2 max pool after a SparseConv2d moves into the kernel's store pass;
  :func:`fuse_pairs`: two SparseConv2d in a row run as one call, chunk by chunk (both run by
  :func:`apb_sparse.deploy`).
* :func:`unfuse`: the inverse of the three (used by ``densify`` and ``compact``).

Both fusions trace the model with ``torch.fx``; patterns that do not match exactly are left
alone.  A candidate that cannot be fused safely (a BatchNorm without running statistics, a module
called more than once, a residual that is a parameter or buffer, a model fx cannot trace) stays
unfused and is listed with the reason in ``model.apb_fuse_skipped`` (``{module or node name:
reason}``); fusing never raises for such a model.  A fused residual add checks its operand at run
time: when it does not have the conv output's shape and dtype after broadcasting, that call is
computed unfused, with PyTorch's broadcasting and type promotion.
"""
from __future__ import annotations

import copy
import operator
import warnings
from collections import Counter
from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.masked import MaskedLayer
from ..nn.pool import MaxPool2x2
from ..nn.sparse import SparseConv2d
from .layouts import layer_classes

__all__ = ["fold_batchnorm", "fuse_activations", "fuse_pools", "fuse_pairs", "unfuse", "fused_conv_add", "batchnorm_tail", "trace"]

_LEAVES = layer_classes() + MaskedLayer
_RELU_FUNCTIONS = {F.relu, torch.relu}
_ADD = {operator.add, operator.iadd, torch.add}
_FOLDABLE_CONVS = (nn.Conv2d,) + tuple(t for t in MaskedLayer if issubclass(t, nn.Conv2d))


# Activations f with f(0) == 0: a BatchNorm + activation module maps a zero channel to zero when
# its BatchNorm does (what compact needs), and folding keeps the activation as a module.
ZERO_PRESERVING = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Tanh, nn.Hardswish, nn.Mish,
                   nn.Identity, nn.Dropout, nn.Dropout2d)


def _known_batchnorm(m: nn.Module) -> bool:
    """A BatchNorm2d whose forward we know: BatchNorm2d's own, or timm's ``BatchNormAct2d``
    layout (batch_norm, then ``self.drop``, then ``self.act``)."""
    if not isinstance(m, nn.BatchNorm2d):
        return False
    forward = type(m).forward
    if forward is nn.BatchNorm2d.forward or forward is nn.modules.batchnorm._BatchNorm.forward:
        return True
    return type(m).__name__.endswith("BatchNormAct2d") and isinstance(getattr(m, "drop", None), nn.Module) \
        and isinstance(getattr(m, "act", None), nn.Module)


def batchnorm_tail(bn: nn.Module) -> Optional[nn.Module]:
    """What stays of a BatchNorm2d module once its normalisation is folded into a conv, or None
    when it is not a BatchNorm2d whose forward we know.

    ``nn.BatchNorm2d`` (or a subclass that keeps its forward) leaves ``nn.Identity()``; a module in
    timm's ``BatchNormAct2d`` layout leaves its ``drop`` and ``act`` modules.
    """
    if not _known_batchnorm(bn):
        return None
    mods = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
            if isinstance(m, nn.Module) and type(m) is not nn.Identity]
    return mods[0] if len(mods) == 1 else (nn.Sequential(*mods) if mods else nn.Identity())


class _Tracer(fx.Tracer):
    """Keeps apb_sparse layers and BatchNorm2d subclasses (timm's BatchNormAct2d) as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or _known_batchnorm(m) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` graph of ``model`` with apb_sparse layers and BatchNorm modules as leaves (the
    one tracer of fold_batchnorm, fuse_activations and compact). Raises what fx raises."""
    return fx.GraphModule(model, _Tracer().trace(model), model.__class__.__name__)


def _trace_or_mark(model: nn.Module):
    """``_trace(model)``'s graph, or None after recording why in ``model.apb_fuse_skipped``."""
    gm, why = _trace(model)
    if gm is None:
        model.apb_fuse_skipped = {"": why}
    return gm


def _trace(model: nn.Module) -> Tuple[Optional[fx.GraphModule], Optional[str]]:
    """``(graph module, None)``, or ``(None, why fx cannot trace the model)``."""
    try:
        return trace(model), None
    except Exception as e:  # data-dependent control flow, unsupported Python: leave the model alone
        return None, f"torch.fx cannot trace the model ({type(e).__name__}: {e}); nothing was fused"


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise ValueError("fusions change training-mode semantics (BatchNorm batch statistics): "
                         "call model.eval() first")


def _module_calls(graph: fx.Graph) -> Counter:
    return Counter(n.target for n in graph.nodes if n.op == "call_module")


@torch.no_grad()
def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm2d whose only input is a conv (used by nothing else) into that conv.

    Returns a model whose folded BatchNorm modules are ``nn.Identity`` (a BatchNorm + activation
    module such as timm's ``BatchNormAct2d`` leaves its activation, see :func:`batchnorm_tail`);
    same outputs in eval mode.
    BatchNorms that cannot be folded stay (see ``apb_fuse_skipped`` in the module docstring).
    """
    _check_eval(model)
    if not inplace:
        model = copy.deepcopy(model)
    skipped: Dict[str, str] = {}
    gm = _trace_or_mark(model)
    if gm is None:
        return model
    mods = dict(model.named_modules())
    calls = _module_calls(gm.graph)
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if not (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(mods.get(src.target), nn.Conv2d)):
            continue  # not fed by a conv: nothing to fold into
        conv, bn = mods[src.target], mods[node.target]
        if bn.running_mean is None or bn.running_var is None:
            skipped[node.target] = ("track_running_stats=False: it normalises with batch statistics even in "
                                    "eval mode, which no conv weight can express")
        elif type(conv) not in _FOLDABLE_CONVS:
            skipped[node.target] = f"its input comes from {type(conv).__name__}, not a plain or masked Conv2d"
        elif calls[src.target] > 1 or calls[node.target] > 1:
            skipped[node.target] = "the conv or the BatchNorm module is called more than once in the model"
        elif len(src.users) != 1:
            skipped[node.target] = f"the output of {src.target} is also used elsewhere"
        elif bn.num_features != conv.out_channels:
            skipped[node.target] = f"{bn.num_features} features, but {src.target} has {conv.out_channels} channels"
        elif not _known_batchnorm(bn):
            skipped[node.target] = f"{type(bn).__name__} overrides BatchNorm2d.forward in a way apb_sparse does not know"
        else:
            tail = batchnorm_tail(bn)
            _fold(conv, bn)
            parent, _, child = node.target.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, tail)
    model.apb_fuse_skipped = skipped
    return model


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    # In the BatchNorm's dtype, then cast: a float16 conv after a float32 BatchNorm is common.
    scale, shift = _bn_scale_shift(bn, bn.running_var.dtype, conv.weight.device)
    conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device))
    conv.bias.copy_((conv.bias.to(scale.dtype) * scale + shift).to(conv.bias.dtype))


def _is_relu(node: fx.Node, mods) -> bool:
    if node.op == "call_module":
        m = mods.get(node.target)
        return type(m) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1 and not node.kwargs.get("inplace", False)
    if node.op == "call_method":
        return node.target == "relu" and len(node.args) == 1 and not node.kwargs
    return False


def _skip_identity(node: fx.Node, mods) -> fx.Node:
    """Follow single-user chains of nn.Identity (folded BatchNorms) downstream."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "call_module" and type(mods.get(user.target)) is nn.Identity:
            node = user
        else:
            break
    return node


def fused_conv_add(conv: SparseConv2d, input: Tensor, residual) -> Tensor:
    """``conv(input) + residual`` (then ReLU if ``conv.fused_relu``): ``conv(input, residual)``,
    the add in the kernel's epilogue where that is exact (see :meth:`SparseConv2d.forward`)."""
    return conv(input, residual)


@torch.no_grad()
def fuse_activations(model: nn.Module) -> nn.Module:
    """Move ReLUs and residual adds that follow a SparseConv2d into its kernel.

    Returns an ``fx.GraphModule`` with the same submodules (and state_dict keys), or ``model``
    itself (unfused) when fx cannot trace it; either way ``apb_fuse_skipped`` lists what was not
    fused and why.
    """
    _check_eval(model)
    skipped: Dict[str, str] = {}
    gm = _trace_or_mark(model)
    if gm is None:
        return model
    mods = dict(gm.named_modules())
    calls = _module_calls(gm.graph)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(mods.get(node.target), SparseConv2d):
            continue
        conv = mods[node.target]
        if conv.fused_relu or len(node.args) != 1 or node.kwargs:
            continue
        tail = _skip_identity(node, mods)
        if len(tail.users) != 1:
            continue
        user = next(iter(tail.users))
        is_add = user.op == "call_function" and user.target in _ADD and len(user.args) == 2 and not user.kwargs
        if not (_is_relu(user, mods) or is_add):
            continue
        if calls[node.target] > 1:
            skipped[node.target] = "called more than once: a fused epilogue would apply to every call"
            continue
        if not is_add:
            conv.fused_relu = True
            user.replace_all_uses_with(tail)
            gm.graph.erase_node(user)
            continue
        other = user.args[1] if user.args[0] is tail else user.args[0]
        if not isinstance(other, fx.Node) or other is tail:
            skipped[node.target] = "the add's other operand is a constant or the conv output itself"
            continue
        if other.op == "get_attr":
            skipped[node.target] = (f"the add's other operand is the parameter or buffer {other.target!r}: "
                                    "it is the same for every input, not a residual branch")
            continue
        if user.target is operator.iadd and user.args[0] is not tail:
            skipped[node.target] = "the add writes in place into its other operand"
            continue
        relu = next(iter(user.users)) if len(user.users) == 1 else None
        relu = relu if relu is not None and _is_relu(relu, mods) else None
        with gm.graph.inserting_before(user):
            # A module call (a leaf for every fx tracer, so the graph survives torch.save).
            fused = gm.graph.call_module(node.target, (node.args[0], other))
        if relu is not None:
            conv.fused_relu = True
        (relu if relu is not None else user).replace_all_uses_with(fused)
        if relu is not None:
            gm.graph.erase_node(relu)
        gm.graph.erase_node(user)
        chain, cur = [node], node  # the conv and the identity chain after it, now unused
        while cur is not tail:
            cur = next(iter(cur.users))
            chain.append(cur)
        for c in reversed(chain):
            gm.graph.erase_node(c)
    # Folded BatchNorms left nn.Identity modules behind: calling them costs Python overhead only.
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(mods.get(node.target)) is nn.Identity and len(node.args) == 1 \
                and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.apb_fuse_skipped = skipped
    return gm


def _is_pool2x2(node: fx.Node, mods) -> bool:
    """``nn.MaxPool2d(2, 2)`` exactly (a module, or ``F.max_pool2d(x, 2)`` / ``(x, 2, 2)``)."""
    if node.op == "call_module":
        m = mods.get(node.target)
        return isinstance(m, nn.MaxPool2d) and (type(m) is MaxPool2x2 or MaxPool2x2.can_replace(m)) \
            and len(node.args) == 1 and not node.kwargs
    if node.op != "call_function" or node.target not in (F.max_pool2d, torch.max_pool2d) or len(node.args) > 6:
        return False
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    given = dict(zip(names, node.args[1:]), **node.kwargs)
    if set(given) - set(names) or "kernel_size" not in given:
        return False
    stride = given.get("stride")
    return MaxPool2x2.can_replace(nn.MaxPool2d(given["kernel_size"], None if stride in (None, [], ()) else stride,
                                               given.get("padding", 0), given.get("dilation", 1),
                                               given.get("return_indices", False), given.get("ceil_mode", False)))


@torch.no_grad()
def fuse_pools(model: nn.Module) -> list:
    """Move every ``nn.MaxPool2d(2, 2)`` that is the only user of a :class:`SparseConv2d` called once
    into that conv (``fused_pool``: the kernel pools in its store pass, and the unpooled output is
    never written).  In place, on an ``fx.GraphModule`` (:func:`fuse_activations`' result; other
    models are left alone).  Returns the fused pools (module names, or node names of
    ``F.max_pool2d`` calls); a pool module no longer called is removed.

    Run by :func:`apb_sparse.deploy` after :func:`fuse_activations`; :func:`unfuse` undoes it.
    Measured (AMD EPYC Zen 3, 2 threads, batch 32, 95 % sparse 3x3 convs + ReLU + pool, one
    process alternating): 0.80x the time of conv then pool on 64->64 32x32 maps, 0.85-0.94x on
    VGG-16's smaller ones (docs/performance.md).
    """
    if not isinstance(model, fx.GraphModule):
        return []
    mods = dict(model.named_modules())
    calls = _module_calls(model.graph)
    fused = []
    for node in list(model.graph.nodes):
        if not _is_pool2x2(node, mods) or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        conv = mods.get(src.target) if src.op == "call_module" else None
        if not isinstance(conv, SparseConv2d) or conv.fused_pool or len(src.users) != 1 or calls[src.target] > 1:
            continue
        conv.fused_pool = True
        node.replace_all_uses_with(src)
        model.graph.erase_node(node)
        fused.append(node.target if node.op == "call_module" else node.name)
        if node.op == "call_module":
            calls[node.target] -= 1
            if calls[node.target] == 0:  # no longer called: not left as a module that looks in use
                model.delete_submodule(node.target)
    if fused:
        model.graph.lint()
        model.recompile()
    return fused


def _shortcut_of(user: fx.Node, x, first: SparseConv2d, mods, calls) -> Optional[fx.Node]:
    """The residual node of a pair's second conv when it is a shortcut the pair can run itself: a
    SparseConv2d called once, only by this add, on the pair's input x, 1x1 with the first conv's
    stride, no padding, dilation or groups, no fused epilogue."""
    node = user.args[1] if len(user.args) == 2 else None
    sc = mods.get(node.target) if isinstance(node, fx.Node) and node.op == "call_module" else None
    if not isinstance(sc, SparseConv2d) or node.args != (x,) or node.kwargs or len(node.users) != 1 \
            or calls[node.target] > 1 or first.groups != 1:
        return None
    if sc.kernel_size != (1, 1) or sc.stride != first.stride or sc.padding_mode != "zeros" or sc._plan.pre is not None \
            or sc._plan.kernel != (0, 0) or sc.dilation != (1, 1) or sc.groups != 1 or sc.fused_relu or sc.fused_pool \
            or sc.fused_prev is not None:
        return None
    return node


@torch.no_grad()
def fuse_pairs(model: nn.Module) -> list:
    """Run every :class:`SparseConv2d` whose output only feeds the next SparseConv2d together with it
    (``apb_sparse::sparse_conv2d_pair``: chunk by chunk, the intermediate activation stays in the
    kernel's layout instead of a round trip through NCHW memory).  In place, on an
    ``fx.GraphModule`` after :func:`fuse_activations` and :func:`fuse_pools`; other models are left
    alone.  The second conv's node then takes the first conv's input, and the second conv holds the
    first in ``fused_prev`` (a plain attribute: state_dict keys are unchanged).  Pairs do not chain:
    in a run of convs, the first two pair, then the next two.  When the second conv's residual is a
    1x1 conv of the pair's input (ResNet's downsampling shortcut), that conv runs in the same call
    too (``fused_shortcut``).  Returns ``[(first, second)]`` or ``[(first, second, shortcut)]``
    module names.  :func:`unfuse` undoes it.

    Measured (AMD EPYC Zen 3, 2 threads, batch 32, ResNet-18 shapes, 95 % sparse, one process
    alternating, bit-identical outputs): a pair of 64-channel 3x3 convs on 32x32 maps with the
    residual 0.87x the time of the two calls, 16x16 0.94x, 8x8 0.97x, 4x4 0.99x.
    """
    if not isinstance(model, fx.GraphModule):
        return []
    mods = dict(model.named_modules())
    calls = _module_calls(model.graph)
    pairs = []
    for node in list(model.graph.nodes):
        first = mods.get(node.target) if node.op == "call_module" else None
        if not isinstance(first, SparseConv2d) or len(node.args) != 1 or node.kwargs or len(node.users) != 1 \
                or calls[node.target] > 1 or first.fused_pool or first.fused_prev is not None or first.padding_mode != "zeros":
            continue
        user = next(iter(node.users))
        second = mods.get(user.target) if user.op == "call_module" else None
        if not isinstance(second, SparseConv2d) or user.args[0] is not node or node in user.args[1:] \
                or user.kwargs or calls[user.target] > 1 or second.fused_prev is not None \
                or second.padding_mode != "zeros":
            continue
        second.__dict__["fused_prev"] = first  # not a submodule (setattr would register it)
        second.__dict__["fused_prev_name"] = node.target
        x = node.args[0]
        shortcut = _shortcut_of(user, x, first, mods, calls)
        if shortcut is not None:  # the residual is a 1x1 conv of the same input: run in the same call
            second.__dict__["fused_shortcut"] = mods[shortcut.target]
            second.__dict__["fused_shortcut_name"] = shortcut.target
            user.args = (x,)
            model.graph.erase_node(shortcut)
        else:
            user.args = (x,) + tuple(user.args[1:])
        model.graph.erase_node(node)
        pairs.append((node.target, user.target) + ((shortcut.target,) if shortcut is not None else ()))
    if pairs:
        model.graph.lint()
        model.recompile()
    return pairs


@torch.no_grad()
def unfuse(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_activations`, :func:`fuse_pools` and :func:`fuse_pairs` in place: every
    fused ReLU, residual add, max pool and conv pair of a ``fx.GraphModule`` goes back into its
    graph as separate nodes, and the convs' ``fused_relu`` / ``fused_pool`` / ``fused_prev`` are
    cleared.  Other models are returned unchanged.  Returns ``model``.
    """
    if not isinstance(model, fx.GraphModule):
        return model
    g = model.graph
    mods = dict(model.named_modules())
    relu_off = []
    for node in list(g.nodes):  # pairs first: the second conv's node then reads the first's output
        second = mods.get(node.target) if node.op == "call_module" else None
        if isinstance(second, SparseConv2d) and second.fused_prev is not None:
            x = node.args[0]
            with g.inserting_before(node):
                first = g.call_module(second.fused_prev_name, (x,))
                if second.fused_shortcut is not None:
                    node.args = (first, g.call_module(second.fused_shortcut_name, (x,)))
                    del second.__dict__["fused_shortcut"], second.__dict__["fused_shortcut_name"]
                else:
                    node.args = (first,) + tuple(node.args[1:])
            del second.__dict__["fused_prev"], second.__dict__["fused_prev_name"]
    for node in list(g.nodes):
        if node.op == "call_function" and node.target is fused_conv_add:  # graphs made before 0.2
            ref, x, residual = node.args
            target = ref.target
        elif node.op == "call_module" and isinstance(mods.get(node.target), SparseConv2d) and \
                (len(node.args) == 2 or mods[node.target].fused_relu or mods[node.target].fused_pool):
            ref, target = None, node.target  # a conv called with a residual, or with its ReLU fused
            x, residual = node.args[0], (node.args[1] if len(node.args) == 2 else None)
        else:
            continue
        conv = mods[target]
        with g.inserting_before(node):
            out = g.call_module(target, (x,))
            if residual is not None:
                out = g.call_function(operator.add, (out, residual))
            if conv.fused_relu:
                out = g.call_function(torch.relu, (out,))
            if conv.fused_pool:
                out = g.call_function(F.max_pool2d, (out, 2, 2))
        node.replace_all_uses_with(out)
        g.erase_node(node)
        if ref is not None and not ref.users:
            g.erase_node(ref)
        relu_off.append(conv)
    for conv in relu_off:
        conv.fused_relu = False
        conv.fused_pool = False
    g.lint()
    model.recompile()
    return model


def _bn_scale_shift(bn: nn.BatchNorm2d, dtype: torch.dtype, device: torch.device) -> Tuple[Tensor, Tensor]:
    var, mean = bn.running_var, bn.running_mean
    scale = (bn.weight if bn.weight is not None else torch.ones_like(var)) / torch.sqrt(var + bn.eps)
    shift = (bn.bias if bn.bias is not None else torch.zeros_like(mean)) - mean * scale
    return scale.to(device=device, dtype=dtype), shift.to(device=device, dtype=dtype)

# --------------------------------------------------------------------------------------------
# Removed: the eval fusions of sparsify(fuse="auto").  They made the converted model fast by
# caches that guessed when the model changed, and guessed wrong (in-place BatchNorm statistics,
# attributes read by forward, .item() in a trace).  apb_sparse.deploy is the explicit step now.
# --------------------------------------------------------------------------------------------

def _removed(name: str) -> None:
    warnings.warn(f"apb_sparse.fuse.{name} is deprecated and does nothing: sparsify keeps the model's own "
                  "forward; use apb_sparse.deploy(model, example_input) for a fast inference snapshot",
                  FutureWarning, stacklevel=3)


def enable_eval_fusions(model: nn.Module) -> nn.Module:
    """Deprecated no-op (warns): use :func:`apb_sparse.deploy`. Returns ``model`` unchanged."""
    _removed("enable_eval_fusions")
    return model


def disable_eval_fusions(model: nn.Module) -> nn.Module:
    """Deprecated no-op (warns). Returns ``model`` unchanged."""
    _removed("disable_eval_fusions")
    return model


def has_eval_fusions(model: nn.Module) -> bool:
    """Deprecated (warns): always False, no model has the removed eval fusions."""
    _removed("has_eval_fusions")
    return False


def use_torchscript(enable: bool) -> bool:
    """Deprecated no-op (warns): :func:`apb_sparse.deploy` takes ``script=``. Returns True."""
    if not isinstance(enable, bool):
        raise TypeError(f"enable must be a bool, got {type(enable).__name__}")
    _removed("use_torchscript")
    return True
