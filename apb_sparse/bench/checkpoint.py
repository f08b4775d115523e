"""Safe checkpoints: safetensors files (no pickle), sparse layers stored as their nonzeros.

Our format (``save_checkpoint`` / ``load_checkpoint``): one ``.safetensors`` file holding the
state dict of the *deployment* model (``SparseConv2d`` / ``SparseLinear`` store CSR
``values`` / ``row_ptr`` / ``col_idx``, so only nonzeros are saved) and, in the file's metadata,
the JSON config needed to rebuild it: architecture, ``get_model`` options, number of classes and
input channels, and the per-layer path chosen by ``apb_sparse.sparsify``. A ``.json`` copy of the
config is written next to it for people.

Bring-your-own checkpoints (``read_state_dict`` / ``load_dense_model``): a plain state dict of
dense tensors (pruned weights are zeros), as ``.safetensors`` or as a ``torch.save`` file read
with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects. Loading is
strict: a missing or unexpected key is an error, never silently random weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .results import atomic_write_bytes, atomic_write_text

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "read_state_dict", "load_dense_model",
           "state_dict_bytes", "infer_io", "save_state_dict", "is_apb_checkpoint"]

FORMAT = "apb_sparse.checkpoint/1"
PathLike = Union[str, os.PathLike]
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "weights")


def _plain_tensors(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    # safetensors refuses tensors sharing storage and non-contiguous ones: give it private copies.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def state_dict_bytes(state: Mapping[str, Tensor]) -> int:
    """Size in bytes of ``state`` serialised as safetensors (the model-size column)."""
    from safetensors.torch import save

    return len(save(_plain_tensors(state)))


def save_state_dict(state: Mapping[str, Tensor], path: PathLike,
                    metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write a state dict as safetensors, atomically."""
    from safetensors.torch import save

    return atomic_write_bytes(path, save(_plain_tensors(state), metadata=metadata))


def save_checkpoint(model: nn.Module, path: PathLike, *, arch: str, num_classes: int,
                    in_channels: int, model_kwargs: Optional[Dict[str, Any]] = None,
                    extra: Optional[Dict[str, Any]] = None) -> Path:
    """Save a (sparsified or dense) model with the config needed to rebuild it.

    Args:
        model: a model returned by ``apb_sparse.sparsify`` (its ``apb_sparse_choices`` give the
            per-layer paths), or a plain dense model.
        path: the ``.safetensors`` file; ``path.with_suffix(".json")`` gets the config too.
        arch, num_classes, in_channels, model_kwargs: how to build the architecture.
        extra: more JSON-able information stored in the config (method, sparsity, ...).

    Returns:
        The path written.
    """
    path = Path(path)
    choices = getattr(model, "apb_sparse_choices", None) or {}
    config = {"format": FORMAT, "arch": arch, "num_classes": int(num_classes),
              "in_channels": int(in_channels), "model_kwargs": dict(model_kwargs or {}),
              "paths": {name: c.path for name, c in choices.items()}}
    if extra:
        config["extra"] = extra
    blob = json.dumps(config, sort_keys=True, default=str)
    save_state_dict(model.state_dict(), path, metadata={"apb_sparse_config": blob})
    atomic_write_text(path.with_suffix(".json"), json.dumps(config, indent=1, sort_keys=True, default=str))
    return path


def _read_metadata(path: Path) -> Optional[Dict[str, str]]:
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def is_apb_checkpoint(path: PathLike) -> bool:
    """True for a file written by :func:`save_checkpoint`."""
    try:
        meta = _read_metadata(Path(path)) or {}
    except Exception:
        return False
    return "apb_sparse_config" in meta


def load_checkpoint(path: PathLike, *, device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a model saved by :func:`save_checkpoint` (strict ``load_state_dict``).

    Returns:
        ``(model, config)``; the model is in eval mode on ``device``.

    Raises:
        ValueError: not one of our checkpoints, or the weights do not fit the rebuilt model.
    """
    from .. import sparsify
    from ..models import get_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    meta = _read_metadata(path) or {}
    if "apb_sparse_config" not in meta:
        raise ValueError(f"{path} is not an apb_sparse checkpoint (no 'apb_sparse_config' metadata); "
                         "for a plain state dict use `apb eval --checkpoint FILE --arch ... --dataset ...`")
    config = json.loads(meta["apb_sparse_config"])
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {config.get('format')!r}, expected {FORMAT!r}")
    model = get_model(config["arch"], num_classes=config["num_classes"], in_channels=config["in_channels"],
                      **config.get("model_kwargs", {}))
    if config.get("paths"):
        model = sparsify(model, path=config["paths"], inplace=True)
    state = read_state_dict(path)
    _strict_load(model, state, path)
    return model.to(device).eval(), config


def read_state_dict(path: PathLike) -> Dict[str, Tensor]:
    """Read a state dict without unpickling arbitrary objects.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``. A dict wrapping the state dict under a usual key
    ("state_dict", "model", "net", ...) is unwrapped, and a ``module.`` prefix (DataParallel) is
    removed.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no tensor state dict, or refuses ``weights_only`` loading.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError and friends: name the cause, keep it safe
            raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) (it may hold "
                             f"pickled Python objects, which are never unpickled here): {e}") from None
    for _ in range(3):
        if isinstance(state, Mapping) and not all(isinstance(v, Tensor) for v in state.values()):
            inner = next((state[k] for k in _WRAPPER_KEYS if k in state and isinstance(state[k], Mapping)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if len(tensors) != len(state):
        others = sorted(k for k, v in state.items() if not isinstance(v, Tensor))[:5]
        raise ValueError(f"{path}: the state dict holds non-tensor entries {others}")
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def infer_io(state: Mapping[str, Tensor]) -> Tuple[Optional[int], Optional[int]]:
    """(in_channels, num_classes) guessed from a state dict: the first 4-D weight's input
    channels and the last 2-D weight's rows (the classifier)."""
    in_ch = num_classes = None
    for k, v in state.items():
        if k.endswith("weight") and v.dim() == 4 and in_ch is None:
            in_ch = int(v.shape[1])
        if k.endswith("weight") and v.dim() == 2:
            num_classes = int(v.shape[0])
    return in_ch, num_classes


def _strict_load(model: nn.Module, state: Mapping[str, Tensor], path: PathLike) -> None:
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: the checkpoint does not fit the model: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''} (loading is strict: a missing key "
                         "would leave random weights)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: the checkpoint does not fit the model: {e}") from None


NORMALIZE_KEYS = ("normalize.mean", "normalize.std")


def load_dense_model(path: PathLike, arch: str, *, num_classes: Optional[int] = None,
                     in_channels: Optional[int] = None, model_kwargs: Optional[Dict[str, Any]] = None,
                     normalization: Optional[Tuple[Any, Any]] = None) -> nn.Module:
    """Build ``arch`` and strictly load a dense (with zeros) state dict from ``path`` into it.

    ``num_classes`` / ``in_channels`` default to what the state dict's shapes say.

    Args:
        normalization: ``(mean, std)`` for checkpoints saved by other tools, which carry no
            ``normalize.mean`` / ``normalize.std`` buffers (their normalisation lived outside the
            model): the model then normalises with these statistics.  Ignored when the state dict
            has the buffers; without it such a checkpoint is refused (strict loading).
    """
    from ..models import get_model

    state = dict(read_state_dict(path))
    g_in, g_cls = infer_io(state)
    in_channels = in_channels or g_in
    num_classes = num_classes or g_cls
    if in_channels is None or num_classes is None:
        raise ValueError(f"{path}: cannot tell in_channels / num_classes from the state dict; pass them")
    kwargs = dict(model_kwargs or {})
    supplied = normalization is not None and not any(k in state for k in NORMALIZE_KEYS)
    if supplied:
        kwargs["mean"], kwargs["std"] = normalization
    model = get_model(arch, num_classes=num_classes, in_channels=in_channels, **kwargs)
    if supplied:  # the model's own buffers now hold the supplied statistics
        state.update({k: v for k, v in model.state_dict().items() if k in NORMALIZE_KEYS})
    _strict_load(model, state, path)
    # Where the input normalisation came from, for the caller to report.
    model.apb_normalization = "supplied" if supplied else "checkpoint"
    return model.eval()
