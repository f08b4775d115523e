"""Deployment: a frozen inference snapshot of a model, the form every benchmark times.

:func:`sparsify` swaps layers and keeps the model's own forward, so training, hooks, attributes
and autograd behave as on the dense model.  Speed comes from one explicit step,
:func:`deploy`, in the spirit of ``torch.jit.freeze`` and torch.ao's ``fuse_modules``: it copies
the model and returns a :class:`DeployedModel` with

* every BatchNorm fed only by a conv folded into that conv (timm's ``BatchNormAct2d`` too: its
  activation stays as a module after the conv),
* sparse layers chosen per layer by :func:`~apb_sparse.sparsify`'s cost model (or kept from an
  already sparsified model),
* ReLUs and residual adds after a sparse conv moved into the kernel's epilogue
  (:func:`apb_sparse.fuse.fuse_activations`), 2x2 max pools after one into its store pass
  (:func:`apb_sparse.fuse.fuse_pools`), and two sparse convs in a row run as one call, chunk by
  chunk (:func:`apb_sparse.fuse.fuse_pairs`),
* under ``torch.no_grad()`` / ``inference_mode``, a TorchScript graph of the whole forward
  (``torch.jit.trace``) per input signature, made once and checked against the Python graph:
  the same op calls, dispatched from C++ instead of Python.

The snapshot never looks back at the source model: later changes to it (an optimiser step, a
new attribute, a hook) are not seen, and nothing is revalidated per call.  Deploy again after
changing the model.  Everything the snapshot cannot reproduce is refused with an error at deploy
time (training mode, forward hooks) or falls back to the exact Python graph (a forward that
TorchScript would specialise on data, such as ``.item()`` in control flow, is detected from
TorchScript's own warnings and never traced).
"""
from __future__ import annotations

import copy
import warnings
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_mod
from torch.nn.utils import prune

from ..nn.pool import MaxPool2x2
from .deployed import MAX_TRACES, DeployedModel
from .fuse import fold_batchnorm, fuse_activations, fuse_pairs, fuse_pools
from .sparsify import SPARSE_LAYERS, _replace, bake_torch_prune, densify, sparsify
from .tune import measure_layouts

__all__ = ["deploy", "DeployedModel", "MAX_TRACES"]

def _hooked(model: nn.Module) -> list:
    names = [n or "<model>" for n, m in model.named_modules()
             if m._forward_hooks or (m._forward_pre_hooks and not _only_torch_prune(m))]
    if _module_mod._global_forward_hooks or _module_mod._global_forward_pre_hooks:
        names.append("<global module hooks>")
    return names


def _only_torch_prune(m: nn.Module) -> bool:
    return all(isinstance(h, prune.BasePruningMethod) for h in m._forward_pre_hooks.values())


def deploy(model: nn.Module, example_input: Union[Tensor, Tuple[Tensor, ...]], *,
           masks: Optional[Mapping[str, Tensor]] = None, layout: Union[str, Mapping[str, str]] = "auto",
           script: bool = True, check: bool = True, tune: bool = False,
           path: Union[str, Mapping[str, str], None] = None) -> DeployedModel:
    """A frozen inference snapshot of ``model``: BatchNorms folded, sparse layers, ReLU / residual
    add in the kernel epilogue, a TorchScript graph per input signature.

    This is a snapshot: the source model is copied and never read again, so later changes to it
    are not seen (deploy again).  It is the form ``apb run``, ``apb eval`` and the benchmark
    scripts time.

    Args:
        model: a model in eval mode: dense (zeros in the weights are used), masked
            (:mod:`apb_sparse.nn` masked layers, ``torch.nn.utils.prune``) or already converted by
            :func:`~apb_sparse.sparsify` (its per-layer layouts are kept).
        example_input: an input batch (or tuple of inputs) of the deployment shape: the graph for
            its signature is traced and checked now, and the snapshot's output on it is compared
            with ``model``'s.
        masks: optional ``{layer name: 0/1 mask}`` applied before conversion (as ``sparsify``).
        layout: per-layer layout for layers not already converted (see ``sparsify``);
            ``"dense"`` deploys the dense baseline the benchmarks compare with.
        script: make TorchScript graphs for ``no_grad`` calls (False: always the Python graph).
        check: compare the snapshot's output on ``example_input`` with ``model``'s and raise
            ``RuntimeError`` when they differ by more than rounding.
        tune: choose each layer's layout by timing every layout it can take on its input shape
            from ``example_input`` (:mod:`apb_sparse.convert.tune`), instead of the cost model;
            the times are kept in ``LayerChoice.measured_ms``.  Layers whose layout ``layout``
            names keep it; the layouts of an already converted model are chosen again.
        path: deprecated name of ``layout`` (version 0.2); warns.

    Returns:
        A :class:`DeployedModel`; ``apb_sparse_choices`` and ``apb_deploy_info`` say which layout
        each layer took, what was folded and fused, and whether the graph was traced.

    Raises:
        ValueError: ``model`` is in training mode, or has forward hooks (a snapshot would not run
            them: remove them, or use the model ``sparsify`` returns, which keeps them).
        TypeError: ``model`` is not an ``nn.Module`` or ``example_input`` is not a tensor (tuple).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, DeployedModel):
        raise TypeError("model is already deployed (a DeployedModel): deploy the source model")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise TypeError("example_input must be a tensor or a tuple of tensors, got "
                        f"{type(example_input).__name__}")
    if any(m.training for m in model.modules()):
        raise ValueError("model is in training mode: deploy makes an inference snapshot (BatchNorms folded with "
                         "their running statistics); call model.eval() first")
    hooked = _hooked(model)
    if hooked:
        raise ValueError(f"model has forward hooks on {hooked[:5]}: a deployed snapshot would not run them; "
                         "remove them, or use apb_sparse.sparsify(model), which keeps the model's forward")
    if path is not None:
        warnings.warn("deploy(path=...) is renamed deploy(layout=...)", FutureWarning, stacklevel=2)
        layout = path
    if not isinstance(tune, bool):
        raise TypeError(f"tune must be True or False, got {type(tune).__name__}")
    with torch.no_grad():
        reference = model(*(a.clone() for a in args)) if check else None
    work = bake_torch_prune(copy.deepcopy(model))
    layouts: Union[str, Dict[str, str]] = layout
    if any(isinstance(m, SPARSE_LAYERS) for m in work.modules()):
        # Already converted: fold into dense weights, then convert again with the same layouts.
        kept = {n: c.layout for n, c in getattr(work, "apb_sparse_choices", {}).items()}
        work = densify(work, inplace=True)
        if kept and not tune:  # tune=True times them again
            layouts = {**({} if isinstance(layout, str) else dict(layout)), **kept}
    work = fold_batchnorm(work, inplace=True)
    folded_skipped = dict(getattr(work, "apb_fuse_skipped", {}))
    measured: Dict[str, Dict[str, float]] = {}
    if tune:
        layouts, measured = measure_layouts(work, args, masks, layouts)
    work = sparsify(work, masks, inplace=True, layout=layouts, fuse=False)
    choices = work.apb_sparse_choices
    for name, times in measured.items():
        choices[name].measured_ms = times
    work = fuse_activations(work)
    fused_skipped = dict(getattr(work, "apb_fuse_skipped", {}))
    fused_pools = fuse_pools(work)
    fused_pairs = fuse_pairs(work)
    pools = _fast_pools(work)
    work.apb_sparse_choices = choices
    deployed = DeployedModel(work, script=script)
    deployed.apb_deploy_info = {"fx_graph": isinstance(work, torch.fx.GraphModule),
                                "not_folded": folded_skipped, "not_fused": fused_skipped, "fused_pools": fused_pools,
                                "fused_pairs": fused_pairs, "fast_pools": pools}
    with torch.no_grad():
        got = deployed(*(a.clone() for a in args))
    if check:
        _check_close(reference, got)
    return deployed


def _fast_pools(model: nn.Module) -> List[str]:
    """Swaps every ``nn.MaxPool2d(2, 2)`` of ``model`` for :class:`~apb_sparse.nn.MaxPool2x2` (same
    values, faster on CPU); returns their names."""
    names = [n for n, m in model.named_modules() if n and MaxPool2x2.can_replace(m)]
    for n in names:
        _replace(model, n, MaxPool2x2())
    return names


def _check_close(want, got, where: str = "output") -> None:
    if isinstance(want, Tensor):
        if not isinstance(got, Tensor) or want.shape != got.shape:
            raise RuntimeError(f"deploy: the snapshot's {where} has another type or shape than the model's")
        dtype = torch.float64 if want.dtype == torch.float64 else torch.float32
        w, g = want.detach().to(dtype), got.detach().to(dtype)
        finite = w.isfinite()
        scale = max(1.0, float(w[finite].abs().max())) if finite.any() else 1.0
        tol = {torch.float64: 1e-9, torch.float32: 1e-3}.get(want.dtype, 2e-2) * scale
        # isclose: NaN only equals NaN, an infinity only the same infinity
        if not bool(torch.isclose(w, g, rtol=0.0, atol=tol, equal_nan=True).all()):
            diff = float((w - g)[finite].abs().max()) if finite.any() else float("nan")
            raise RuntimeError(f"deploy: the snapshot's {where} differs from the model's (max difference {diff:.3g} "
                               f"over finite outputs, tolerance {tol:.3g}, or non-finite values moved); "
                               "please report this model")
    elif isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            raise RuntimeError(f"deploy: the snapshot's {where} has another structure than the model's")
        for i, (w, g) in enumerate(zip(want, got)):
            _check_close(w, g, f"{where}[{i}]")
    elif isinstance(want, dict):
        if not isinstance(got, dict) or got.keys() != want.keys():
            raise RuntimeError(f"deploy: the snapshot's {where} has other keys than the model's")
        for k in want:
            _check_close(want[k], got[k], f"{where}[{k!r}]")
