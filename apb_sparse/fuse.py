"""Inference-time fusions for deployed models (eval mode only).

* :func:`fold_batchnorm`: a BatchNorm2d fed only by a convolution is folded into that conv's
  weight and bias (a per-output-channel scale, so zeros stay zeros and sparsity is unchanged).
* :func:`fuse_activations`: a ReLU after a :class:`~apb_sparse.nn.SparseConv2d`, and a residual
  ``add`` (+ ReLU) after one, move into the sparse kernel's epilogue, saving one pass over the
  activation each; at high sparsity those passes cost as much as the convolution itself.
* :func:`unfuse`: the inverse of :func:`fuse_activations` (used by ``densify`` and ``compact``).

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
import inspect
import operator
import warnings
from collections import Counter
from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_mod

from . import ops
from .nn.masked import MaskedLayer
from .nn.sparse import ChannelSparseConv2d, SparseConv2d, SparseLinear

__all__ = ["fold_batchnorm", "fuse_activations", "unfuse", "enable_eval_fusions", "disable_eval_fusions",
           "has_eval_fusions", "eval_chain", "call_identity", "use_torchscript"]

_LEAVES = (SparseConv2d, SparseLinear, ChannelSparseConv2d) + MaskedLayer
_RELU_FUNCTIONS = {F.relu, torch.relu}
_ADD = {operator.add, operator.iadd, torch.add}
_FOLDABLE_CONVS = (nn.Conv2d,) + tuple(t for t in MaskedLayer if issubclass(t, nn.Conv2d))


class _Tracer(fx.Tracer):
    """Keeps apb_sparse layers as leaves (their forward calls custom ops)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def _trace_or_mark(model: nn.Module):
    """``_trace(model)``'s graph, or None after recording why in ``model.apb_fuse_skipped``."""
    gm, why = _trace(model)
    if gm is None:
        model.apb_fuse_skipped = {"": why}
    return gm


def _trace(model: nn.Module) -> Tuple[Optional[fx.GraphModule], Optional[str]]:
    """``(graph module, None)``, or ``(None, why fx cannot trace the model)``."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # data-dependent control flow, unsupported Python: leave the model alone
        return None, f"torch.fx cannot trace the model ({type(e).__name__}: {e}); nothing was fused"
    return fx.GraphModule(model, graph, model.__class__.__name__), None


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise ValueError("fusions change training-mode semantics (BatchNorm batch statistics): "
                         "call model.eval() first")


def _module_calls(graph: fx.Graph) -> Counter:
    return Counter(n.target for n in graph.nodes if n.op == "call_module")


@torch.no_grad()
def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm2d whose only input is a conv (used by nothing else) into that conv.

    Returns a model whose folded BatchNorm modules are ``nn.Identity``; same outputs in eval mode.
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
        if node.op != "call_module" or type(mods.get(node.target)) is not nn.BatchNorm2d:
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
        else:
            _fold(conv, bn)
            parent, _, child = node.target.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
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


def _conv_output_shape(conv: SparseConv2d, input: Tensor) -> torch.Size:
    n, _, h, w = input.shape
    if conv.padding == "same":  # stride 1 (nn.Conv2d refuses "same" otherwise)
        return torch.Size((n, conv.out_channels, h, w))
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    (ph, pw), (dh, dw) = (0, 0) if conv.padding == "valid" else conv.padding, conv.dilation
    return torch.Size((n, conv.out_channels, (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                       (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1))


def _kernel_residual(conv: SparseConv2d, input: Tensor, residual) -> Optional[Tensor]:
    """``residual`` as the kernel's epilogue takes it (the conv output's shape, dtype and device),
    or None when ``conv(input) + residual`` cannot be computed there exactly: a non-tensor, another
    device, or a sum that would promote the dtype or broadcast to a larger shape."""
    if not (isinstance(residual, Tensor) and input.dim() == 4 and residual.device == input.device):
        return None
    shape = _conv_output_shape(conv, input)
    if residual.shape == shape and residual.dtype == input.dtype:
        return residual
    if torch.result_type(input, residual) != input.dtype:
        return None
    try:
        broadcast = torch.broadcast_shapes(shape, residual.shape)
    except RuntimeError:
        return None
    return residual.to(input.dtype).expand(shape).contiguous() if broadcast == shape else None


def fused_conv_add(conv: SparseConv2d, input: Tensor, residual) -> Tensor:
    """``conv(input) + residual`` (then ReLU if ``conv.fused_relu``), the add in the kernel's
    epilogue when ``residual`` broadcasts to the conv output's shape and the sum keeps the conv's
    dtype and device; otherwise computed unfused, exactly as eager PyTorch would.

    :func:`fuse_activations` puts calls to it in the graph; it is not meant to be called by hand.
    """
    kernel_residual = _kernel_residual(conv, input, residual)
    if kernel_residual is not None:
        return conv(input, kernel_residual)
    relu = conv.fused_relu
    # fuse_activations fuses only convs called once in the graph, so no other call sees the flag.
    conv.fused_relu = False
    try:
        out = conv(input)
    finally:
        conv.fused_relu = relu
    out = out + residual
    return torch.relu(out) if relu else out


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
            ref = gm.graph.get_attr(node.target)
            fused = gm.graph.call_function(fused_conv_add, (ref, node.args[0], other))
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


@torch.no_grad()
def unfuse(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_activations` in place: every fused ReLU and residual add of a
    ``fx.GraphModule`` goes back into its graph as a separate node, and the convs' ``fused_relu``
    flags are cleared.  Other models are returned unchanged.  Returns ``model``.
    """
    if not isinstance(model, fx.GraphModule):
        return model
    g = model.graph
    mods = dict(model.named_modules())
    relu_off = []
    for node in list(g.nodes):
        if node.op == "call_function" and node.target is fused_conv_add:
            ref, x, residual = node.args
            target = ref.target
        elif node.op == "call_module" and isinstance(mods.get(node.target), SparseConv2d) and \
                (len(node.args) == 2 or mods[node.target].fused_relu):
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
        node.replace_all_uses_with(out)
        g.erase_node(node)
        if ref is not None and not ref.users:
            g.erase_node(ref)
        relu_off.append(conv)
    for conv in relu_off:
        conv.fused_relu = False
    g.lint()
    model.recompile()
    return model


# --------------------------------------------------------------------------------------------
# Eval fusions that keep the model: sparsify()'s default (fuse="auto").
# --------------------------------------------------------------------------------------------

def _resolve(model: nn.Module, target: str):
    obj = model
    for part in target.split(".") if target else []:
        obj = getattr(obj, part)
    return obj


def _bn_scale_shift(bn: nn.BatchNorm2d, dtype: torch.dtype, device: torch.device) -> Tuple[Tensor, Tensor]:
    var, mean = bn.running_var, bn.running_mean
    scale = (bn.weight if bn.weight is not None else torch.ones_like(var)) / torch.sqrt(var + bn.eps)
    shift = (bn.bias if bn.bias is not None else torch.zeros_like(mean)) - mean * scale
    return scale.to(device=device, dtype=dtype), shift.to(device=device, dtype=dtype)


_ABSENT = torch.empty(0)  # stands for a missing bias / affine parameter in a fold's sources
_VERSION = operator.attrgetter("_version")


def _fold_sources(conv: nn.Module, bn: nn.BatchNorm2d) -> tuple:
    cp, bp, bb = conv._parameters, bn._parameters, bn._buffers
    stored = conv._buffers["values"] if type(conv) is SparseConv2d else cp["weight"]
    bias, weight, shift = cp.get("bias"), bp.get("weight"), bp.get("bias")
    mean, var = bb.get("running_mean"), bb.get("running_var")
    return (stored, _ABSENT if bias is None else bias, _ABSENT if weight is None else weight,
            _ABSENT if shift is None else shift, _ABSENT if mean is None else mean, _ABSENT if var is None else var)


def _folded(conv: nn.Module, bn: nn.BatchNorm2d) -> Optional[Tuple[Tensor, Tensor]]:
    """``conv``'s stored weights (CSR values, dense weight or kept block) and bias with the eval
    BatchNorm ``bn`` folded in, or None when ``bn`` has no running statistics or another number
    of features.  Cached in ``conv.__dict__["_apb_fold"]`` with the source tensors (kept alive,
    so their ids stay theirs) and versions, ``bn`` and ``eps``: any in-place update
    (load_state_dict, an optimiser step) or replacement (``.to()``, a new buffer) recomputes it."""
    sources = _fold_sources(conv, bn)
    ids = tuple(map(id, sources))
    try:
        versions = tuple(map(_VERSION, sources))
    except RuntimeError:  # inference tensors (made in inference_mode) have no version counter:
        versions = None   # in-place updates cannot be seen, so fold at every call
    hit = conv.__dict__.get("_apb_fold")
    if versions is not None and hit is not None and hit[0] is bn and hit[1] == bn.eps and hit[3] == ids and hit[4] == versions:
        return hit[5]
    if sources[4] is _ABSENT or sources[5] is _ABSENT or bn.num_features != conv.out_channels:
        return None
    stored = sources[0]
    with torch.no_grad():
        scale, shift = _bn_scale_shift(bn, stored.dtype, stored.device)
        if type(conv) is SparseConv2d:
            rows = torch.repeat_interleave(torch.arange(conv.out_channels, device=stored.device),
                                           (conv.row_ptr[1:] - conv.row_ptr[:-1]).to(torch.int64))
            weight = (stored * scale[rows]).contiguous()
        elif type(conv) is ChannelSparseConv2d:
            weight = stored * scale[conv.out_index].view(-1, 1, 1, 1)
        else:
            weight = stored * scale.view(-1, 1, 1, 1)
        bias = shift if sources[1] is _ABSENT else sources[1].detach() * scale + shift
    if versions is not None:
        conv.__dict__["_apb_fold"] = (bn, bn.eps, sources, ids, versions, (weight, bias))
    return weight, bias


def _needs_param_grad(conv: nn.Module, bn: Optional[nn.Module]) -> bool:
    """Whether autograd needs gradients for a parameter the fused path would treat as a constant."""
    for m in (conv, bn):
        if m is not None:
            for p in m._parameters.values():
                if p is not None and p.requires_grad:
                    return True
    return False


_FUSABLE_CONVS = (SparseConv2d, ChannelSparseConv2d, nn.Conv2d)


class _AmbiguousAdd(Exception):
    """A traced add whose result would differ between ``out + r`` and ``out += r``."""


def _check_add(out: Tensor, residual) -> None:
    # torch.fx records ``out += r`` as ``out + r`` (a Proxy has no __iadd__).  The two agree when
    # the sum keeps out's dtype and shape; otherwise only the model's own forward knows which it
    # was, and _EvalForward runs that instead.
    if isinstance(residual, Tensor):
        if residual.dtype != out.dtype and torch.result_type(out, residual) != out.dtype:
            raise _AmbiguousAdd
        if residual.shape != out.shape:
            try:
                shape = torch.broadcast_shapes(out.shape, residual.shape)
            except RuntimeError:
                shape = None
            if shape != out.shape:
                raise _AmbiguousAdd


def _add(op: str, out: Tensor, residual, conv_first: bool):
    """The traced add: ``out + residual`` / ``residual + out``, or ``operator.iadd``."""
    if op == "iadd":
        out += residual
        return out
    _check_add(out, residual)
    return out + residual if conv_first else residual + out


def _plain(m: nn.Module) -> bool:
    """No forward (pre-)hooks on ``m`` or globally: skipping its call changes nothing observable."""
    return not (m._forward_hooks or m._forward_pre_hooks or _module_mod._global_forward_hooks
                or _module_mod._global_forward_pre_hooks)


def _tail(out: Tensor, residual, add_op: Optional[str], conv_first: bool, relu) -> Tensor:
    """The chain's add and ReLU steps, unfused."""
    if add_op is not None:
        out = _add(add_op, out, residual, conv_first)
    if relu is True:
        return torch.relu(out)
    return out if relu is None else relu(out)


def eval_chain(conv: nn.Module, input: Tensor, bn: Optional[nn.Module], residual, add_op: Optional[str],
               conv_first: bool, relu) -> Tensor:
    """``relu(add(bn(conv(input)), residual))`` with each step optional, computed fused where
    that is exactly the same function: the BatchNorm folded into the conv's weights (cached), and
    for a :class:`SparseConv2d` the residual add and ReLU in the kernel's epilogue.

    :func:`enable_eval_fusions` puts calls to it in a model's eval forward, with the modules
    looked up on the model at every call.  ``relu`` is None, True (a functional ReLU) or the
    ReLU module.  Whenever a module is no longer what the fusion assumes (another type, training
    mode, hooks, a BatchNorm without running statistics), or autograd needs gradients for their
    parameters, the chain runs unfused, exactly as eager PyTorch.
    """
    tc = type(conv)
    ok = (tc is SparseConv2d or tc is nn.Conv2d or tc is ChannelSparseConv2d) and _plain(conv) \
        and not getattr(conv, "fused_relu", False) \
        and (relu is None or relu is True or (type(relu) is nn.ReLU and _plain(relu))) \
        and (bn is None or (type(bn) is nn.BatchNorm2d and not bn.training and _plain(bn))) \
        and not (torch.is_grad_enabled() and _needs_param_grad(conv, bn))
    folded = _folded(conv, bn) if ok and bn is not None else None
    if not ok or (bn is not None and folded is None):
        out = conv(input)
        return _tail(out if bn is None else bn(out), residual, add_op, conv_first, relu)
    if folded is not None:
        weight, bias = folded
    else:
        weight = conv._buffers["values"] if tc is SparseConv2d else conv._parameters["weight"]
        bias = conv._parameters.get("bias")
    if tc is SparseConv2d:
        kernel_residual = None if add_op is None else _kernel_residual(conv, input, residual)
        if add_op is None or kernel_residual is not None:
            return conv._run(input, weight, bias, kernel_residual, relu is not None)
        out = conv._run(input, weight, bias, None, False)
    elif tc is ChannelSparseConv2d:
        out = conv._run(input, weight, bias)
    else:
        out = conv._conv_forward(input, weight, bias)
    return _tail(out, residual, add_op, conv_first, relu)


def call_identity(module: nn.Module, input):
    """``module(input)``, without the module call's overhead while ``module`` is a hook-free
    ``nn.Identity`` (identity shortcuts; :func:`enable_eval_fusions` puts these calls in)."""
    if type(module) is nn.Identity and _plain(module):
        return input
    return module(input)


class _EvalForward:
    """A model's ``forward`` with eval fusions: the class's own forward in training mode or for
    calls with other arguments than traced, the fused graph's code otherwise."""

    def __init__(self, owner: nn.Module, fn, n_args: int):
        self.owner, self.fn, self.n_args = owner, fn, n_args
        self.runner = None  # _ScriptRunner, made on the first no_grad call

    def __call__(self, *args, **kwargs):
        owner = self.owner
        if owner.training or kwargs or len(args) != self.n_args:
            return type(owner).forward(owner, *args, **kwargs)
        fn = self.fn
        if fn is None:  # after unpickling: trace again
            fn, _, _ = _eval_graph(owner)
            self.fn = fn if fn is not None else False
            fn = self.fn
        if fn is False:
            return type(owner).forward(owner, *args, **kwargs)
        if not torch.is_grad_enabled() and _SCRIPT[0]:
            runner = self.runner
            if runner is None:
                runner = self.runner = _ScriptRunner()
            out = runner(owner, fn, args)
            if out is not _MISS:
                return out
        try:
            return fn(owner, *args)
        except _AmbiguousAdd:
            return type(owner).forward(owner, *args)

    def __getstate__(self):
        # The generated code is not picklable; it is traced again on first use.
        return {"owner": self.owner, "fn": None, "n_args": self.n_args, "runner": None}

    def __setstate__(self, state):
        state.setdefault("runner", None)
        self.__dict__.update(state)

    def __deepcopy__(self, memo):
        return _EvalForward(copy.deepcopy(self.owner, memo), self.fn, self.n_args)


# ----------------------------------------------------------------------------- C++ graph runner
# At batch 1 and high sparsity a sparse layer computes for tens of microseconds, and the Python
# around each call (module lookups, checks, the op's Python binding) costs about as much.  Under
# no_grad / inference_mode, _ScriptRunner runs the fused forward as a TorchScript graph instead
# (torch.jit.trace of the fused code: the same op calls, dispatched from C++).  A trace fixes
# everything the Python code reads, so it is only used while that stays the same: it is keyed on
# the arguments' shapes, strides, dtypes and devices, and dropped whenever the model's state
# signature changes (see _state_signature); a trace is made on the second call with the same key
# and state (so code that changes the model before every call never pays for tracing; the first
# call after a change refreshes the BatchNorm fold cache, itself part of the state), checked
# against the Python path on that call, and not used for a model whose trace fails or differs.
_SCRIPT = [True]
_MISS = object()
_MAX_TRACES = 4  # argument keys kept per model
_TRACE_BUDGET = 8  # traces a model may make before tracing needs 2 uses per trace to go on


def use_torchscript(enable: bool) -> bool:
    """Whether eval-fused models run their forward as a TorchScript graph under no_grad /
    inference_mode (default True); returns the previous setting.  Off: the fused Python code runs
    every call (same results; for A/B timing, or torch builds without TorchScript)."""
    if not isinstance(enable, bool):
        raise TypeError(f"enable must be a bool, got {type(enable).__name__}")
    prev, _SCRIPT[0] = _SCRIPT[0], enable
    return prev


def _global_hooks() -> bool:
    return any(len(getattr(_module_mod, n, ())) for n in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks", "_global_module_registration_hooks",
        "_global_parameter_registration_hooks", "_global_buffer_registration_hooks"))


def _state_signature(model: nn.Module) -> Optional[list]:
    """What a trace of ``model``'s fused forward fixes, as a list to compare: every module (walked
    live, so a replaced module is seen) with its attributes (mode, sizes, and other objects by
    identity: ``tuple(__dict__.values())``), every parameter and buffer by identity and version
    (in-place updates are seen).  Not seen: in-place changes inside a container attribute (a list
    an attribute holds).  None when a module has hooks (they must fire in Python) or holds
    inference tensors (made in inference_mode; they have no version counter)."""
    sig = []
    append = sig.append
    stack, seen = [model], set()
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        d = m.__dict__
        stack.extend(d["_modules"].values())
        if d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]:
            return None
        append(m)
        append(tuple(d.values()))
        p, b = d["_parameters"], d["_buffers"]
        try:
            if p:
                append(tuple(map(id, p.values())))
                append([t._version for t in p.values() if t is not None])
            if b:
                append(tuple(map(id, b.values())))
                append([t._version for t in b.values() if t is not None])
        except RuntimeError:  # an inference tensor: no version counter, changes cannot be seen
            return None
    return sig


def _same_signature(a: Optional[list], b: list) -> bool:
    try:
        return a is not None and a == b
    except Exception:  # noqa: BLE001 - e.g. a replaced tensor attribute: Tensor.__eq__ is elementwise
        return False


def _args_key(args) -> Optional[tuple]:
    key = []
    for a in args:
        if not isinstance(a, Tensor):
            return None
        key.append((tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad))
    return tuple(key)


def _same(a, b) -> bool:
    """Outputs of the trace and of the Python path agree exactly (structure, shapes, values; NaN
    where the other has NaN)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and bool(((a == b) | (a.isnan() & b.isnan())).all()))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return False


class _Traced(nn.Module):
    """The module torch.jit.trace records: the fused code bound to the model (the model's
    parameters and buffers become the script module's attributes)."""

    def __init__(self, owner: nn.Module, fn):
        super().__init__()
        self.owner = owner
        self._fn = fn

    def forward(self, *args):
        return self._fn(self.owner, *args)


class _ScriptRunner:
    """Per model: traces keyed on the arguments, valid for one state signature."""

    def __init__(self):
        self.sig = None
        self.traces: Dict[tuple, object] = {}  # key -> script module, or False (trace failed)
        self.seen: Dict[tuple, int] = {}
        self.disabled = False
        self.made = self.served = 0  # traces made, calls run by a trace

    def __call__(self, owner: nn.Module, fn, args):
        if self.disabled or torch.jit.is_tracing() or torch.compiler.is_compiling() or _global_hooks():
            return _MISS
        key = _args_key(args)
        if key is None:
            return _MISS
        sig = _state_signature(owner)
        if sig is None:
            return _MISS
        if not _same_signature(self.sig, sig):
            self.sig, self.traces, self.seen = sig, {}, {}
        script = self.traces.get(key)
        if script is None:
            n = self.seen.get(key, 0) + 1
            self.seen[key] = n
            if n < 2 or len(self.traces) >= _MAX_TRACES:
                return _MISS
            return self._trace(owner, fn, args, key)
        if script is False:
            return _MISS
        self.served += 1
        with ops._BELOW_AUTOGRAD():
            return script(*args)

    def _trace(self, owner, fn, args, key):
        self.made += 1
        if self.made > _TRACE_BUDGET and self.served < 2 * self.made:
            # the model keeps changing between short runs of calls: tracing would cost more
            # (a fraction of a second each) than it saves
            self.disabled = True
            return _MISS
        try:
            expected = fn(owner, *args)
        except _AmbiguousAdd:
            self.traces[key] = False
            return _MISS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation notice; shape checks fixed by the key
                with ops._BELOW_AUTOGRAD():
                    script = torch.jit.trace(_Traced(owner, fn), tuple(args), check_trace=False, strict=False)
                    got = script(*args)
        except Exception:  # noqa: BLE001 - an untraceable forward keeps the Python path
            self.traces[key] = False
            return expected
        if not _same(got, expected):
            self.disabled = True  # the trace does not compute the same function: never use it
            return expected
        self.traces[key] = script
        return expected


def _forward_params(model: nn.Module):
    """``(number of required positional arguments, {defaulted name: default})`` of the model's
    class forward, or ``(None, why)`` when its signature cannot be specialised."""
    try:
        sig = inspect.signature(type(model).forward)
    except (TypeError, ValueError) as e:
        return None, f"its forward has no inspectable signature ({e})"
    params = list(sig.parameters.values())[1:]
    required, concrete = 0, {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return None, "its forward takes *args / **kwargs"
        if p.default is p.empty:
            if p.kind is p.KEYWORD_ONLY:  # (a required positional cannot follow a defaulted one)
                return None, "its forward has required keyword-only arguments"
            required += 1
        else:
            concrete[p.name] = p.default
    return required, concrete


def _eval_graph(model: nn.Module):
    """``(fused forward function or None, number of positional arguments, {name: why not fused})``."""
    required, concrete = _forward_params(model)
    if required is None:
        return None, 0, {"": f"eval fusions need a plain forward signature: {concrete}"}
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # control flow on self.training must take its eval branch
    try:
        graph = _Tracer().trace(model, concrete_args=concrete or None)
    except Exception as e:
        return None, required, {"": f"torch.fx cannot trace the model ({type(e).__name__}: {e}); nothing was fused"}
    finally:
        for m, t in modes:
            m.training = t
    gm = fx.GraphModule(model, graph, model.__class__.__name__)
    for node in gm.graph.nodes:  # the code runs against the model itself: every name must be its own
        if node.op in ("get_attr", "call_module"):
            try:
                ok = _resolve(model, node.target) is _resolve(gm, node.target)
            except AttributeError:
                ok = False
            if not ok:
                return None, required, {"": f"the traced graph refers to {node.target!r}, which is not an attribute "
                                            "of the model (a constant torch.fx created); nothing was fused"}
    skipped: Dict[str, str] = {}
    fused = _rewrite_chains(gm, skipped)
    if not fused:
        return None, required, skipped
    mods = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(mods.get(node.target)) is nn.Identity and len(node.args) == 1 \
                and not node.kwargs:
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(call_identity, (gm.graph.get_attr(node.target), node.args[0]))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return type(gm).forward, required, skipped


def _rewrite_chains(gm: fx.GraphModule, skipped: Dict[str, str]) -> int:
    g = gm.graph
    mods = dict(gm.named_modules())
    calls = _module_calls(g)
    fused = 0
    for node in list(g.nodes):
        conv = mods.get(node.target) if node.op == "call_module" else None
        if type(conv) not in _FUSABLE_CONVS or getattr(conv, "fused_relu", False):
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        if calls[node.target] > 1:
            skipped[node.target] = "called more than once: a fused epilogue would apply to every call"
            continue
        chain, cur = [node], node
        bn = add = relu = None
        user = next(iter(cur.users)) if len(cur.users) == 1 else None
        if user is not None and user.op == "call_module" and type(mods.get(user.target)) is nn.BatchNorm2d:
            m = mods[user.target]
            if m.running_mean is None or m.running_var is None:
                skipped[user.target] = ("track_running_stats=False: it normalises with batch statistics even in "
                                        "eval mode, which no conv weight can express")
            elif calls[user.target] > 1:
                skipped[user.target] = "the BatchNorm module is called more than once in the model"
            elif m.num_features != conv.out_channels:
                skipped[user.target] = f"{m.num_features} features, but {node.target} has {conv.out_channels}"
            elif len(user.args) == 1 and not user.kwargs:
                bn, cur = user, user
                chain.append(cur)
        elif user is None and len(cur.users) > 1:
            bn_users = [u for u in cur.users if u.op == "call_module" and type(mods.get(u.target)) is nn.BatchNorm2d]
            if bn_users:
                skipped[bn_users[0].target] = f"the output of {node.target} is also used elsewhere"
        if isinstance(conv, SparseConv2d):
            user = next(iter(cur.users)) if len(cur.users) == 1 else None
            if user is not None and user.op == "call_function" and user.target in _ADD and len(user.args) == 2 \
                    and not user.kwargs:
                other = user.args[1] if user.args[0] is cur else user.args[0]
                if isinstance(other, fx.Node) and other is not cur and other.op != "get_attr" and \
                        not (user.target is operator.iadd and user.args[0] is not cur):
                    add, cur = user, user
                    chain.append(cur)
            user = next(iter(cur.users)) if len(cur.users) == 1 else None
            if user is not None and _is_relu(user, mods):
                relu, cur = user, user
                chain.append(cur)
        if bn is None and add is None and relu is None:
            continue
        with g.inserting_before(cur):
            conv_ref = g.get_attr(node.target)
            bn_ref = g.get_attr(bn.target) if bn is not None else None
            relu_arg = None
            if relu is not None:
                relu_arg = g.get_attr(relu.target) if relu.op == "call_module" else True
            if add is not None:
                conv_first = add.args[0] is (bn if bn is not None else node)
                add_args = (add.args[1] if conv_first else add.args[0], "iadd" if add.target is operator.iadd else "add",
                            conv_first)
            else:
                add_args = (None, None, True)
            new = g.call_function(eval_chain, (conv_ref, node.args[0], bn_ref) + add_args + (relu_arg,))
        cur.replace_all_uses_with(new)
        for c in reversed(chain):
            g.erase_node(c)
        fused += 1
    return fused


def enable_eval_fusions(model: nn.Module) -> nn.Module:
    """Give ``model`` a fused forward for eval mode, keeping its modules, names and state_dict.

    The model's forward is traced with ``torch.fx`` (in eval mode, arguments with defaults
    specialised to their defaults); each conv -> BatchNorm -> residual add -> ReLU chain (every
    step optional) becomes one :func:`eval_chain` call, which folds the BatchNorm into the conv's
    weights (cached until a weight or statistic changes) and, for a :class:`SparseConv2d`, moves
    the add and ReLU into the kernel.  The fused forward runs when the model is in eval mode and
    is called with the traced positional arguments only; otherwise the class's own forward runs.
    Modules are looked up on the model at every call, so replacing one is seen; but Python control
    flow in ``forward`` that depends on attributes other than ``training`` is fixed at tracing
    time: call this again (or :func:`disable_eval_fusions`) after changing such attributes.
    torch.fx records ``out += r`` as ``out + r``; for a call where the two differ (``r``
    would promote the conv output's dtype or broadcast it to a larger shape) the model's own
    forward computes the result instead (forward hooks of modules before that point then fire
    twice for that call).
    Under ``torch.no_grad()`` / ``inference_mode`` the fused forward is run as a TorchScript
    graph (``torch.jit.trace`` of the fused code, made on the second call with the same argument
    shapes and model state, the third after a BatchNorm fold is refreshed, and checked against
    the Python path once): the same op calls dispatched from C++, without the Python around every
    layer.  The trace is dropped whenever a module,
    parameter, buffer or attribute changes (see :func:`use_torchscript` to turn this off).
    What was not fused, and why, is in ``model.apb_fuse_skipped``.  Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    disable_eval_fusions(model)
    fn, n_args, skipped = _eval_graph(model)
    if fn is not None:
        model.__dict__["forward"] = _EvalForward(model, fn, n_args)
    model.apb_fuse_skipped = skipped
    return model


def disable_eval_fusions(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_eval_fusions` (the class's forward again, in every mode). Returns ``model``."""
    if isinstance(model.__dict__.get("forward"), _EvalForward):
        del model.__dict__["forward"]
    return model


def has_eval_fusions(model: nn.Module) -> bool:
    """Whether :func:`enable_eval_fusions` gave ``model`` a fused eval forward."""
    return isinstance(model.__dict__.get("forward"), _EvalForward)
