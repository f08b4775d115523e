"""Alias of :mod:`apb_sparse.bench.prepare` (the old name; ``setup.py`` inside a package reads like a build script)."""
from .prepare import _base_path, build_model, get_base_model, load_data, make_recipe, resolve_device  # noqa: F401
