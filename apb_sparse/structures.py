"""The one vocabulary of pruning structures, shared by masks, methods, presets and the CLI.

* ``"unstructured"``: any single weight may be pruned.
* ``"filter"``: whole output filters of conv layers (the survey's "structured" pruning; the
  deployment layout for such layers is also called ``"filter"``).

Older spellings are accepted as aliases everywhere a structure is an argument: ``"us"`` for
unstructured; ``"structured"``, ``"s"``, ``"filters"``, ``"channel"``, ``"channels"`` for filter.
"""
from __future__ import annotations

__all__ = ["STRUCTURES", "STRUCTURE_ALIASES", "normalize_structure"]

STRUCTURES = ("unstructured", "filter")
STRUCTURE_ALIASES = {"unstructured": "unstructured", "us": "unstructured",
                     "filter": "filter", "filters": "filter", "structured": "filter", "s": "filter",
                     "channel": "filter", "channels": "filter"}


def normalize_structure(structure: str, argument: str = "structure") -> str:
    """Canonical structure name (``"unstructured"`` or ``"filter"``); a ValueError naming
    ``argument`` for anything else."""
    if not isinstance(structure, str) or structure.lower() not in STRUCTURE_ALIASES:
        raise ValueError(f"{argument} must be one of {sorted(STRUCTURE_ALIASES)}, got {structure!r}")
    return STRUCTURE_ALIASES[structure.lower()]
