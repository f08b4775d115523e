"""Inference-time fusions for deployed models (eval mode only).

* :func:`fold_batchnorm`: a BatchNorm2d fed only by a convolution is folded into that conv's
  weight and bias (a per-output-channel scale, so zeros stay zeros and sparsity is unchanged).
* :func:`fuse_activations`: a ReLU after a :class:`~apb_sparse.nn.SparseConv2d`, and a residual
  ``add`` (+ ReLU) after one, move into the sparse kernel's epilogue, saving one pass over the
  activation each; at high sparsity those passes cost as much as the convolution itself.

Both trace the model with ``torch.fx``; patterns that do not match exactly are left alone.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .nn.masked import MaskedLayer
from .nn.sparse import ChannelSparseConv2d, SparseConv2d, SparseLinear

__all__ = ["fold_batchnorm", "fuse_activations"]

_LEAVES = (SparseConv2d, SparseLinear, ChannelSparseConv2d) + MaskedLayer
_RELU_FUNCTIONS = {F.relu, torch.relu}
_ADD = {operator.add, operator.iadd, torch.add}


class _Tracer(fx.Tracer):
    """Keeps apb_sparse layers as leaves (their forward calls custom ops)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    graph = _Tracer().trace(model)
    return fx.GraphModule(model, graph, model.__class__.__name__)


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise ValueError("fusions change training-mode semantics (BatchNorm batch statistics): "
                         "call model.eval() first")


@torch.no_grad()
def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm2d whose only input is a conv (used by nothing else) into that conv.

    Returns a model whose folded BatchNorm modules are ``nn.Identity``; same outputs in eval mode.
    """
    _check_eval(model)
    if not inplace:
        model = copy.deepcopy(model)
    gm = _trace(model)
    mods = dict(model.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(mods.get(node.target)) is not nn.BatchNorm2d:
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv = mods[src.target]
        if not (isinstance(conv, nn.Conv2d) and type(conv) in (nn.Conv2d,) + tuple(
                t for t in MaskedLayer if issubclass(t, nn.Conv2d))):
            continue
        bn = mods[node.target]
        scale = (bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)) / torch.sqrt(
            bn.running_var + bn.eps)
        shift = (bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
        conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros_like(shift, dtype=conv.weight.dtype))
            conv.bias.zero_()
        conv.bias.copy_(conv.bias * scale + shift)
        parent, _, child = node.target.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    return model


def _is_relu(node: fx.Node, mods) -> bool:
    if node.op == "call_module":
        m = mods.get(node.target)
        return type(m) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1 and not node.kwargs.get("inplace", False)
    if node.op == "call_method":
        return node.target == "relu"
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


@torch.no_grad()
def fuse_activations(model: nn.Module) -> fx.GraphModule:
    """Move ReLUs and residual adds that follow a SparseConv2d into its kernel.

    Returns an ``fx.GraphModule`` with the same submodules (and state_dict keys).
    """
    _check_eval(model)
    gm = _trace(model)
    mods = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(mods.get(node.target), SparseConv2d):
            continue
        conv = mods[node.target]
        if conv.fused_relu or len(node.args) != 1:
            continue
        tail = _skip_identity(node, mods)
        if len(tail.users) != 1:
            continue
        user = next(iter(tail.users))
        if _is_relu(user, mods):
            conv.fused_relu = True
            user.replace_all_uses_with(tail)
            gm.graph.erase_node(user)
            continue
        if user.op == "call_function" and user.target in _ADD and len(user.args) == 2 and not user.kwargs:
            other = user.args[1] if user.args[0] is tail else user.args[0]
            if not isinstance(other, fx.Node) or other is tail or user.args[0] is user.args[1]:
                continue
            relu = next(iter(user.users)) if len(user.users) == 1 else None
            # The conv (and the identity chain after it) must run after the residual is
            # computed: move them right before the add, where both operands exist.
            chain, cur = [node], node
            while cur is not tail:
                cur = next(iter(cur.users))
                chain.append(cur)
            for c in chain:
                user.prepend(c)
            node.args = (node.args[0], other)
            result = user
            if relu is not None and _is_relu(relu, mods):
                conv.fused_relu = True
                result = relu
            result.replace_all_uses_with(tail)
            if result is relu and relu is not None:
                gm.graph.erase_node(relu)
            gm.graph.erase_node(user)
    # Folded BatchNorms left nn.Identity modules behind: calling them costs Python overhead only.
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(mods.get(node.target)) is nn.Identity and len(node.args) == 1 \
                and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
