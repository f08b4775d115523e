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

Files are untrusted input: a truncated, corrupted or tampered file (bad header, metadata that is
not our JSON config, CSR buffers that do not describe the layer's weight) raises
:class:`CheckpointError`, a ``ValueError`` whose one-line message names the file and the problem.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import ops, sparsify
from ..models import get_model
from ..nn.sparse import ChannelSparseConv2d, SparseConv2d, SparseLinear
from .results import atomic_write_bytes, atomic_write_text

__all__ = ["FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "read_state_dict",
           "load_dense_model", "state_dict_bytes", "infer_io", "save_state_dict", "is_apb_checkpoint"]

FORMAT = "apb_sparse.checkpoint/1"
PathLike = Union[str, os.PathLike]
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "weights")
# Far above any image classifier here; a tampered config asking for more would only exhaust memory.
_MAX_IO = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, not in the expected format, or not
    fitting the model it describes.  The message names the file."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    # torch.load's weights_only refusal is a paragraph of advice to unpickle; keep its cause.
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation", 1)[0].strip()
    return text


def _plain_tensors(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    # safetensors refuses tensors sharing storage and non-contiguous ones: give it private copies.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def state_dict_bytes(state: Mapping[str, Tensor]) -> int:
    """Size in bytes of ``state`` serialised as safetensors (the model-size column)."""
    from safetensors.torch import save  # optional ('bench' extra): imported on use

    return len(save(_plain_tensors(state)))


def save_state_dict(state: Mapping[str, Tensor], path: PathLike,
                    metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write a state dict as safetensors, atomically."""
    from safetensors.torch import save  # optional ('bench' extra): imported on use

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
              "paths": {name: c.layout for name, c in choices.items()}}
    if extra:
        config["extra"] = extra
    blob = json.dumps(config, sort_keys=True, default=str)
    save_state_dict(model.state_dict(), path, metadata={"apb_sparse_config": blob})
    atomic_write_text(path.with_suffix(".json"), json.dumps(config, indent=1, sort_keys=True, default=str))
    return path


def _read_metadata(path: Path) -> Optional[Dict[str, str]]:
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open  # optional ('bench' extra): imported on use

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read: {_one_line(e)}") from None
    except Exception as e:  # SafetensorError (bad header), and whatever a crafted file triggers
        raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupted?): "
                              f"{_one_line(e)}") from None


def is_apb_checkpoint(path: PathLike, *, strict: bool = False) -> bool:
    """True for a file written by :func:`save_checkpoint`.

    Args:
        strict: raise :class:`CheckpointError` for a ``.safetensors`` file that cannot be parsed
            (instead of answering False, which would send it down the plain-state-dict path).
    """
    try:
        meta = _read_metadata(Path(path)) or {}
    except CheckpointError:
        if strict:
            raise
        return False
    return "apb_sparse_config" in meta


def _parse_config(path: Path, blob: str) -> Dict[str, Any]:
    """The JSON config of one of our checkpoints, every field checked."""
    try:
        config = json.loads(blob)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the apb_sparse_config metadata is not valid JSON: {_one_line(e)}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the apb_sparse_config metadata must be a JSON object, got "
                              f"{type(config).__name__}")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {config.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in ("arch", "num_classes", "in_channels") if k not in config]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint config has no {', '.join(repr(k) for k in missing)} "
                              "(needed to rebuild the model)")
    if not isinstance(config["arch"], str):
        raise CheckpointError(f"{path}: config 'arch' must be a string, got {config['arch']!r}")
    for k in ("num_classes", "in_channels"):
        v = config[k]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= _MAX_IO:
            raise CheckpointError(f"{path}: config {k!r} must be an integer in [1, {_MAX_IO}], got {v!r}")
    if not isinstance(config.get("model_kwargs", {}), dict):
        raise CheckpointError(f"{path}: config 'model_kwargs' must be a JSON object, got "
                              f"{config['model_kwargs']!r}")
    paths = config.get("paths") or {}
    if not isinstance(paths, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in paths.items()):
        raise CheckpointError(f"{path}: config 'paths' must map layer names to path names")
    return config


def load_checkpoint(path: PathLike, *, device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a model saved by :func:`save_checkpoint` (strict ``load_state_dict``).

    Returns:
        ``(model, config)``; the model is in eval mode on ``device``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: (a ``ValueError``) not one of our checkpoints, unreadable, a config that
            does not describe a model, or weights that do not fit the rebuilt model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    meta = _read_metadata(path) or {}
    if "apb_sparse_config" not in meta:
        raise CheckpointError(f"{path} is not an apb_sparse checkpoint (no 'apb_sparse_config' metadata); "
                              "for a plain state dict use `apb eval --checkpoint FILE --arch ... --dataset ...`")
    config = _parse_config(path, meta["apb_sparse_config"])
    state = read_state_dict(path)  # before building: a broken file should not cost a model build
    try:
        model = get_model(config["arch"], num_classes=config["num_classes"], in_channels=config["in_channels"],
                          **config.get("model_kwargs", {}))
        if config.get("paths"):
            model = sparsify(model, layout=config["paths"], inplace=True)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: its config does not describe a model that can be built "
                              f"(arch {config['arch']!r}): {_one_line(e)}") from None
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
        from safetensors.torch import load_file  # optional ('bench' extra): imported on use

        _read_metadata(path)  # a bad header gets its own message
        try:
            state: Any = load_file(str(path))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read: {_one_line(e)}") from None
        except Exception as e:  # SafetensorError: tensor data out of the file's bounds, bad dtypes
            raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupted?): "
                                  f"{_one_line(e)}") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read: {_one_line(e)}") from None
        except Exception as e:  # pickle.UnpicklingError and friends: name the cause, keep it safe
            raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True) (truncated, not "
                                  "a torch.save file, or it holds pickled Python objects, which are never "
                                  f"unpickled here): {_one_line(e)}") from None
    for _ in range(3):
        if isinstance(state, Mapping) and not all(isinstance(v, Tensor) for v in state.values()):
            inner = next((state[k] for k in _WRAPPER_KEYS if k in state and isinstance(state[k], Mapping)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if len(tensors) != len(state):
        others = sorted(k for k, v in state.items() if not isinstance(v, Tensor))[:5]
        raise CheckpointError(f"{path}: the state dict holds non-tensor entries {others}")
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
        raise CheckpointError(f"{path}: the checkpoint does not fit the model: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''} (loading is strict: a missing key "
                         "would leave random weights)")
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as e:  # shape mismatches; layers refusing corrupt buffers
        raise CheckpointError(f"{path}: the checkpoint does not fit the model: {_one_line(e)}") from None
    _check_sparse_buffers(model, path)


def _check_sparse_buffers(model: nn.Module, path: PathLike) -> None:
    """Refuse CSR buffers that do not describe their layer's weight (a tampered file loads them
    with valid shapes; the kernels would read out of bounds or compute garbage)."""
    check = getattr(ops, "check_csr", None)
    for name, layer in model.named_modules():
        try:
            if isinstance(layer, (SparseConv2d, SparseLinear)) and check is not None:
                check(layer.values, layer.row_ptr, layer.col_idx, layer.weight_shape,
                      names=(f"{name}.values", f"{name}.row_ptr", f"{name}.col_idx"))
            elif isinstance(layer, ChannelSparseConv2d):
                for attr, size in (("out_index", layer.out_channels), ("in_index", layer.in_channels)):
                    idx = getattr(layer, attr)
                    if idx.dim() != 1 or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size)) or \
                            idx.unique().numel() != idx.numel():
                        raise ValueError(f"{name}.{attr} must hold distinct channel indices in [0, {size})")
                expected = (layer.out_index.numel(), layer.in_index.numel(), *layer.kernel_size)
                if tuple(layer.weight.shape) != expected:
                    raise ValueError(f"{name}.weight has shape {tuple(layer.weight.shape)}, expected {expected} "
                                     "(kept output filters, kept input channels, kernel)")
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: corrupted sparse layer {name!r}: {_one_line(e)}") from None


NORMALIZE_KEYS = ("normalize.mean", "normalize.std")


def load_dense_model(path: PathLike, arch: str, *, num_classes: Optional[int] = None,
                     in_channels: Optional[int] = None, model_kwargs: Optional[Dict[str, Any]] = None,
                     normalization: Optional[Tuple[Any, Any]] = None,
                     state: Optional[Mapping[str, Tensor]] = None) -> nn.Module:
    """Build ``arch`` and strictly load a dense (with zeros) state dict from ``path`` into it.

    ``num_classes`` / ``in_channels`` default to what the state dict's shapes say.

    Args:
        normalization: ``(mean, std)`` for checkpoints saved by other tools, which carry no
            ``normalize.mean`` / ``normalize.std`` buffers (their normalisation lived outside the
            model): the model then normalises with these statistics.  Ignored when the state dict
            has the buffers; without it such a checkpoint is refused (strict loading).
        state: the state dict already read from ``path`` by :func:`read_state_dict` (so that a
            caller checking the file first does not read it twice); ``path`` then only names it.
    """
    state = dict(read_state_dict(path) if state is None else state)
    g_in, g_cls = infer_io(state)
    in_channels = in_channels or g_in
    num_classes = num_classes or g_cls
    if in_channels is None or num_classes is None:
        raise CheckpointError(f"{path}: cannot tell in_channels / num_classes from the state dict; pass them")
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
