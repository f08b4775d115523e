"""The registry of pruning methods: ``register`` (class decorator), ``available``, ``get``."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Type

if TYPE_CHECKING:  # base.py re-exports this module's names, so a runtime import would be a cycle
    from .base import PruningMethod

__all__ = ["register", "available", "get"]

_REGISTRY: Dict[str, Type[PruningMethod]] = {}


def register(cls: Type[PruningMethod]) -> Type[PruningMethod]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    key = cls.name.lower()
    if key in _REGISTRY and _REGISTRY[key] is not cls:
        raise ValueError(f"a pruning method named {cls.name!r} is already registered")
    _REGISTRY[key] = cls
    return cls


def available() -> List[str]:
    """Names of the registered methods, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Type[PruningMethod]:
    """The method class registered under ``name`` (case-insensitive)."""
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        raise ValueError(f"unknown pruning method {name!r}; expected one of {available()}")
    return _REGISTRY[name.lower()]
