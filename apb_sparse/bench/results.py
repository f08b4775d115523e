"""Resumable results: one JSON record per line, appended as each benchmark cell finishes.

Crash safety: a record is written as one complete line with a single ``write`` and then
``flush`` + ``os.fsync``, so an interrupted run leaves at worst one torn *last* line. Readers skip
lines that do not parse (and say so), and the next append starts on a fresh line, so a torn line
never corrupts the record written after it. Whole files (leaderboards, checkpoints) are written to
a temporary file and moved into place with ``os.replace``, which is atomic on POSIX.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

__all__ = ["KEY_FIELDS", "cell_key", "cell_id", "ResultsStore", "read_records", "atomic_write_bytes",
           "atomic_write_text"]

KEY_FIELDS = ("method", "arch", "dataset", "structure", "sparsity", "seed")
PathLike = Union[str, os.PathLike]


def _norm_sparsity(s: float) -> float:
    # 0.9 typed on the command line and 0.9000000001 from arithmetic name the same cell.
    return round(float(s), 6)


def cell_key(record_or_fields: Dict[str, Any]) -> Tuple:
    """The identity of a benchmark cell: (method, arch, dataset, structure, sparsity, seed)."""
    missing = [k for k in KEY_FIELDS if k not in record_or_fields]
    if missing:
        raise ValueError(f"record lacks key field(s) {missing}")
    r = record_or_fields
    return (str(r["method"]).lower(), str(r["arch"]), str(r["dataset"]), str(r["structure"]),
            _norm_sparsity(r["sparsity"]), int(r["seed"]))


def cell_id(key: Tuple) -> str:
    """A file-name-safe id of a cell, e.g. ``digits-small_cnn-hydra-unstructured-s0.9-seed0``."""
    method, arch, dataset, structure, sparsity, seed = key
    return f"{dataset}-{arch}-{method}-{structure}-s{sparsity:g}-seed{seed}".replace("/", "_")


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _finite(o):
    """Replace inf / nan floats by strings so the line is strict JSON (FMN distances can be inf)."""
    if isinstance(o, float) and not math.isfinite(o):
        return "inf" if o > 0 else ("-inf" if o < 0 else "nan")
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def read_records(path: PathLike, *, warn: bool = True) -> List[Dict[str, Any]]:
    """All complete records of a JSONL file; unparsable lines (a torn last line after a crash)
    are skipped with a warning. A missing file gives an empty list."""
    path = Path(path)
    if not path.is_file():
        return []
    records, bad = [], []
    with open(path, "rb") as f:
        data = f.read()
    for i, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            bad.append(i)
            continue
        if not isinstance(rec, dict):
            bad.append(i)
            continue
        try:
            cell_key(rec)
        except (ValueError, TypeError):
            bad.append(i)
            continue
        records.append(rec)
    if bad and warn:
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s) {bad[:5]} (an interrupted write); "
                      "those cells will be run again", RuntimeWarning, stacklevel=2)
    return records


class ResultsStore:
    """Append-only JSONL results of one output folder.

    Args:
        path: the JSONL file (created on first append).

    A later record of the same cell replaces an earlier one when reading (``latest()``), so a
    forced rerun of a cell needs no rewrite of the file.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)

    def records(self) -> List[Dict[str, Any]]:
        return read_records(self.path)

    def latest(self) -> Dict[Tuple, Dict[str, Any]]:
        """cell key -> its last complete record."""
        out: Dict[Tuple, Dict[str, Any]] = {}
        for r in self.records():
            out[cell_key(r)] = r
        return out

    def done(self) -> set:
        """Keys of the finished cells."""
        return set(self.latest())

    def repair(self) -> int:
        """Drop unreadable lines (torn writes) from the file, atomically; they are kept in
        ``<file>.bad`` for inspection. Returns how many lines were dropped."""
        if not self.path.is_file():
            return 0
        good, bad = [], []
        for raw in self.path.read_bytes().split(b"\n"):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
                cell_key(rec)
                good.append(raw)
            except (UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError, AttributeError):
                bad.append(raw)
        if bad:
            with open(str(self.path) + ".bad", "ab") as f:
                f.write(b"\n".join(bad) + b"\n")
            atomic_write_bytes(self.path, b"".join(g + b"\n" for g in good))
        return len(bad)

    def append(self, record: Dict[str, Any]) -> None:
        """Append one record as a whole line and fsync it."""
        cell_key(record)  # refuse records that could never be matched on resume
        line = json.dumps(_finite(record), default=_json_default, allow_nan=False, sort_keys=False)
        if "\n" in line:  # pragma: no cover - json.dumps never emits raw newlines
            raise RuntimeError("record serialised to more than one line")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prefix = b""
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    prefix = b"\n"  # a torn last line: start ours on a fresh line
        with open(self.path, "ab") as f:
            f.write(prefix + line.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (no thread creates files
    # between the two calls in this module's use).
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    The file gets the mode a plain ``open(path, "w")`` would give (``0o666`` less the umask, so
    0644 under the usual umask 022): ``mkstemp`` creates 0600 files, which other users of a
    shared run folder (a Ray cluster's workers, a web server) could not read.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
