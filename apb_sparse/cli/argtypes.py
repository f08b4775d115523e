"""The ``type=`` parsers of the ``apb`` options (fractions, bounded numbers, eps, JSON, structures):
a bad value is an argparse usage error saying what was expected."""
from __future__ import annotations

import argparse
import json

from ..structures import STRUCTURES, normalize_structure


def _sparsity(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction of zeros in [0, 1), e.g. 0.9; got {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction of zeros in [0, 1), e.g. 0.9 for 90 %; got {text!r}")
    return v


def _bounded(cast, ok, expected: str):
    """An argparse ``type``: ``cast(text)`` accepted when ``ok(value)``, else "expected <expected>"."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v
    parse.__name__ = expected
    return parse


_positive_int = _bounded(int, lambda v: v > 0, "a positive integer")
_nonneg_int = _bounded(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _bounded(float, lambda v: v > 0, "a number > 0")
_nonneg_float = _bounded(float, lambda v: v >= 0, "a number >= 0")


def _eps(text: str) -> float:
    try:
        if "/" in text:
            a, b = text.split("/", 1)
            v = float(a) / float(b)
        else:
            v = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number >= 0 such as 0.1 or 8/255, got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 such as 0.1 or 8/255, got {text!r}")
    return v


def _json_dict(text: str) -> dict:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 16}}': {e}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 16}}', got {text!r}")
    return v


STRUCTURE_CHOICES = STRUCTURES


def _structure(text: str) -> str:
    try:
        return normalize_structure(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'unstructured' (US) or 'filter' (S, structured), got {text!r}") \
            from None
