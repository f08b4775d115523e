"""ONNX export of sparse models, for ONNX Runtime and for sparse ONNX engines (DeepSparse).

ONNX has no sparse convolution operator, so the exported graph is the dense one with the zeros
kept in its weights: every engine runs it, and sparse engines find the zeros themselves.  The
BatchNorms of a :class:`~apb_sparse.DeployedModel` are already folded into the conv weights (a
per-channel scale, so the zeros stay zeros).  With ``sparse_initializers=True`` the weights
that are mostly zeros are stored as ONNX sparse initializers (values + indices), which makes the
file about ``2 * (1 - sparsity)`` times the dense size (int64 indices); ONNX Runtime densifies
them when it loads the model.  Whether a given sparse engine reads sparse initializers is up to
that engine: the dense-with-zeros file (the default) is the portable choice.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Dict, Tuple, Union

import torch
from torch import Tensor, nn

from ..nn.masked import MaskedLayer
from .deployed import DeployedModel
from .sparsify import SPARSE_LAYERS, bake_torch_prune, densify

__all__ = ["export_onnx"]


def _as_dense(model: nn.Module) -> nn.Module:
    if isinstance(model, DeployedModel) or any(isinstance(m, SPARSE_LAYERS + tuple(MaskedLayer))
                                               for m in model.modules()):
        return densify(model)
    return bake_torch_prune(copy.deepcopy(model))


def _sparsify_initializers(path: str, min_sparsity: float) -> Dict[str, Any]:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(path)
    graph = proto.graph
    kept, moved = [], []
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f" and arr.size >= 64 and (arr == 0).mean() >= min_sparsity:
            flat = arr.reshape(-1)
            idx = np.flatnonzero(flat).astype(np.int64)
            values = numpy_helper.from_array(flat[idx], name=init.name)
            indices = numpy_helper.from_array(idx, name=init.name + "_indices")
            graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, list(arr.shape)))
            moved.append(init.name)
        else:
            kept.append(init)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.save(proto, path)
    return {"sparse_initializers": moved}


def export_onnx(model: nn.Module, example_input: Union[Tensor, Tuple[Tensor, ...]], path: Union[str, os.PathLike],
                *, sparse_initializers: bool = False, min_sparsity: float = 0.5, opset: int = 17,
                dynamic_batch: bool = True) -> Dict[str, Any]:
    """Write ``model`` as an ONNX file: the dense graph with the zeros kept in its weights.

    Args:
        model: a model in eval mode: a :class:`~apb_sparse.DeployedModel` (BatchNorms folded), a
            model converted by :func:`~apb_sparse.sparsify`, a masked or a dense model.
        example_input: an input batch (or tuple of inputs) for the export trace.
        path: the ``.onnx`` file to write (one file, weights inside).
        sparse_initializers: store weights with at least ``min_sparsity`` zeros as ONNX sparse
            initializers (a smaller file; needs the ``onnx`` package).
        opset: ONNX opset (17: what ONNX Runtime, OpenVINO and DeepSparse 1.8 all read).
        dynamic_batch: let the first dimension of inputs and outputs vary.

    Returns:
        ``{"path", "bytes", "sparse_initializers"}``: the file, its size and the initializers
        stored sparse.

    Raises:
        ValueError: ``model`` is in training mode or ``min_sparsity`` is outside [0, 1].
        ImportError: the ``onnx`` package is missing (``pip install apb_sparse[onnx]``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("model is in training mode: call model.eval() before exporting")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise TypeError(f"example_input must be a tensor or a tuple of tensors, got {type(example_input).__name__}")
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError as e:
        raise ImportError("export_onnx needs the onnx package: pip install onnx (or apb_sparse[onnx])") from e
    path = os.fspath(path)
    dense = _as_dense(model).eval()
    names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    axes = {n: {0: "batch"} for n in names + ["output"]} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter's notice
        torch.onnx.export(dense, args, path, dynamo=False, opset_version=opset, input_names=names,
                          output_names=["output"], dynamic_axes=axes, do_constant_folding=True)
    info: Dict[str, Any] = {"sparse_initializers": []}
    if sparse_initializers:
        info = _sparsify_initializers(path, min_sparsity)
    return {"path": path, "bytes": os.path.getsize(path), **info}
