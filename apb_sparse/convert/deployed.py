"""The deployed form: :class:`DeployedModel`, the frozen inference snapshot :func:`~apb_sparse.deploy`
returns (see :mod:`apb_sparse.convert.deploy` for how it is made)."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["DeployedModel", "MAX_TRACES"]

MAX_TRACES = 4
"""Input signatures (shapes, strides, dtypes, devices) a deployed model traces at most; calls with
other signatures run the Python graph (no unbounded growth of compiled graphs)."""


def _signature(args: Tuple[Any, ...]) -> Optional[tuple]:
    key = []
    for a in args:
        if not isinstance(a, Tensor) or a.requires_grad:
            return None
        key.append((tuple(a.shape), tuple(a.stride()), a.dtype, a.device))
    return tuple(key)


def _same_outputs(a, b) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.nan_to_num(0.25), b.nan_to_num(0.25))) \
            and bool(torch.equal(a.isnan(), b.isnan()))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_outputs(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_outputs(a[k], b[k]) for k in a)
    return False


class DeployedModel(nn.Module):
    """A frozen inference snapshot made by :func:`deploy` (eval mode only).

    ``module`` holds the converted model (an ``fx.GraphModule`` when the source could be traced,
    else the converted model itself), whose ``state_dict`` is this model's under ``module.``.
    Grad mode, ``torch.compile`` and ``torch.export`` run ``module``; ``no_grad`` /
    ``inference_mode`` calls run its TorchScript graph for that input signature when one could be
    made (at most :data:`MAX_TRACES`).  ``apb_deploy_info`` says what was folded, fused and traced.
    """

    def __init__(self, module: nn.Module, *, script: bool = True):
        super().__init__()
        self.module = module
        self.script = script
        # Not submodules: they share module's tensors, must not enter state_dict, and are rebuilt
        # after copying or unpickling.
        self.__dict__["_scripts"] = {}
        self.apb_deploy_info: Dict[str, Any] = {}
        super().train(False)

    def train(self, mode: bool = True) -> "DeployedModel":
        if mode:
            raise RuntimeError("a deployed model is an inference snapshot (BatchNorms folded): it has no training "
                               "mode; train the model apb_sparse.sparsify returned, then deploy it again")
        return super().train(False)

    @property
    def apb_sparse_choices(self):
        return getattr(self.module, "apb_sparse_choices", {})

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_scripts"] = {}
        return state

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = {} if k == "_scripts" else copy.deepcopy(v, memo)
        return new

    def _trace(self, args: Tuple[Tensor, ...]):
        """A checked TorchScript graph of ``module`` for these inputs' signature, or a string saying
        why there is none.  Traces on copies: the caller's tensors are never written."""
        probe = tuple(a.clone() for a in args)
        try:
            with warnings.catch_warnings():
                # A TracerWarning means the trace would bake in a value read from data (.item(),
                # a Python bool of a tensor, ...): such a graph is wrong for other inputs.
                warnings.simplefilter("error", torch.jit.TracerWarning)
                # apb_sparse's own layers only compare shapes, and graphs are keyed on shapes.
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"apb_sparse\.")
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
                with torch.no_grad():
                    traced = torch.jit.trace(self.module, probe, check_trace=False, strict=False)
                    want = self.module(*tuple(a.clone() for a in args))
                    got = traced(*tuple(a.clone() for a in args))
        except Exception as e:  # noqa: BLE001 - any tracing failure leaves the exact Python graph
            return f"not traced ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if not _same_outputs(want, got):
            return "not traced: the TorchScript graph's outputs differ from the Python graph's"
        return traced

    def forward(self, *args, **kwargs):
        if kwargs or not self.script or torch.is_grad_enabled() or torch.compiler.is_compiling() \
                or torch.jit.is_tracing() or torch.jit.is_scripting():
            return self.module(*args, **kwargs)
        key = _signature(args)
        if key is None:
            return self.module(*args)
        scripts = self.__dict__["_scripts"]
        fn = scripts.get(key)
        if fn is None:
            if len(scripts) >= MAX_TRACES:
                return self.module(*args)
            fn = scripts[key] = self._trace(args)
            self.apb_deploy_info.setdefault("traces", {})[str(key)] = fn if isinstance(fn, str) else "traced"
        if isinstance(fn, str):
            return self.module(*args)
        return fn(*args)
