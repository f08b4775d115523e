"""A command's inputs checked (or fetched, with ``--download``) before any work starts: names,
output paths, model sizes, finite weights; a failure is one ``apb: error: ...`` line
(:class:`_CliError`) or an argparse usage error naming the option."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode

from .. import methods as registry
from ..bench.checkpoint import CheckpointError, load_checkpoint
from ..data import get_dataset
from ..models import canonical_name, get_model, timm_available


def _check_methods(parser: argparse.ArgumentParser, names: Optional[Sequence[str]], flag: str) -> List[str]:
    avail = registry.available()
    if not names or [n.lower() for n in names] == ["all"]:
        return list(avail)
    bad = [n for n in names if n.lower() not in avail]
    if bad:
        parser.error(f"argument {flag}: unknown method(s) {bad}; expected names from {avail} (or 'all')")
    seen: List[str] = []
    for n in names:
        if n.lower() not in seen:
            seen.append(n.lower())
    return seen


def _check_names(parser, names, flag, valid):
    bad = [n for n in names if n not in valid]
    if bad:
        parser.error(f"argument {flag}: unknown name(s) {bad}; expected names from {sorted(valid)}")


class _CliError(Exception):
    """A failure to report as one ``apb: error: ...`` line (no traceback) with exit code ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int = 2):
    raise _CliError(message, code)


def _check_output(flag: str, path, *, suffix: Optional[str] = None) -> Path:
    """Fail now, before any work, if ``path`` cannot be written (missing parent that cannot be
    created, a file where a folder should be, no permission, a folder given as a file)."""
    out = Path(path)
    if suffix is not None and out.suffix != suffix:
        _fail(f"argument {flag}: {str(out)!r} must end in {suffix}")
    if out.is_dir():
        _fail(f"argument {flag}: {str(out)!r} is a directory, expected a file name")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        _fail(f"argument {flag}: cannot write {str(out)!r}: {str(ancestor)!r} is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=".apb-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        _fail(f"argument {flag}: cannot write {str(out)!r}: {e.strerror or e}")
    return out


def _check_out_folder(flag: str, out: Path) -> None:
    """Fail now, as one line naming ``flag``, if ``out`` cannot be the run folder: a file, under a
    file, or a place this user cannot create or write."""
    if out.exists() and not out.is_dir():
        _fail(f"argument {flag}: {str(out)!r} is a file, expected a folder (for results.jsonl, checkpoints, "
              "the leaderboard)")
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        _fail(f"argument {flag}: cannot create the folder {str(out)!r}: {str(ancestor)!r} is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".apb-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        _fail(f"argument {flag}: cannot write into {str(out)!r}: {e.strerror or e}")


def _available_memory_bytes() -> Optional[int]:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def _check_model_size(flag: str, arch: str, num_classes: int, in_channels: int, model_kwargs) -> None:
    """Refuse, naming ``flag``, options that would make ``get_model`` allocate more than this
    machine's free memory (a corrupted or hostile ``model_kwargs`` such as ``width: 1e8`` is
    otherwise a raw allocator error after a long wait). The model is built on the meta device,
    which allocates nothing."""
    class _FactoriesOnMeta(TorchFunctionMode):
        # Parameters and buffers come from these factories; small constants built from Python
        # values (the normalisation statistics, which the model checks with .item()) stay real.
        FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.empty_like}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in self.FACTORIES:
                kwargs["device"] = "meta"
            return func(*args, **kwargs)

    try:
        with _FactoriesOnMeta():
            m = get_model(arch, num_classes=num_classes, in_channels=in_channels, **dict(model_kwargs or {}))
    except Exception:  # the real build reports its own, named errors
        return
    nbytes = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    free = _available_memory_bytes()
    limit = max(free // 2, 1 << 30) if free else 1 << 36
    if nbytes > limit:
        _fail(f"argument {flag}: model_kwargs {json.dumps(dict(model_kwargs or {}))} build a {arch} with "
              f"{nbytes / 2**30:,.1f} GiB of weights, more than half of the {((free or 0) / 2**30):,.1f} GiB "
              "of free memory; check the width / depth options")


def _check_finite_weights(flag: str, model, path) -> None:
    """Refuse a model whose weights hold NaN or infinite values, naming the first such tensor:
    every output would be NaN, and the evaluation would report garbage numbers."""
    for name, t in list(model.state_dict().items()):
        if not torch.is_tensor(t) or not t.is_floating_point() or t.numel() == 0:
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            nan = int(torch.isnan(t).sum())
            what = "all NaN" if nan == t.numel() else f"{bad} non-finite value(s) ({nan} NaN) of {t.numel()}"
            _fail(f"argument {flag}: {str(path)!r}: tensor {name!r} is {what}; the model cannot be evaluated")


def _load_apb_checkpoint(flag: str, path):
    """``load_checkpoint`` with its failures as one-line errors naming ``flag``."""
    try:
        return load_checkpoint(path)
    except (CheckpointError, FileNotFoundError) as e:
        _fail(f"argument {flag}: {e}")


def _dedupe(values, flag: str, key=lambda v: v) -> list:
    """Values in order, each once; a repeated value is reported (it names the same cells)."""
    out, seen, dup = [], set(), []
    for v in values:
        k = key(v)
        if k in seen:
            dup.append(v)
            continue
        seen.add(k)
        out.append(v)
    if dup:
        print(f"apb run: note: {flag} repeats {sorted(set(dup))}; each cell runs once", file=sys.stderr)
    return out


def _check_arch(parser, name: str, flag: str) -> str:
    """The registry spelling of an architecture name, or a usage error naming ``flag``."""
    try:
        key = canonical_name(name)
    except (ValueError, TypeError) as e:
        parser.error(f"argument {flag}: {e}")
    if key.startswith("timm:") and not timm_available():
        parser.error(f"argument {flag}: {name!r} needs timm: pip install timm (or apb_sparse[timm])")
    return key


def _download(datasets: Sequence[str], data_dir) -> None:
    """``--download``: fetch the torchvision datasets that are missing, before any work."""
    for name in datasets:
        get_dataset(name, data_dir=data_dir, download=True)
