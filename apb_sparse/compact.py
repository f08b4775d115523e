"""Moved to :mod:`apb_sparse.convert.compact`; this import path stays (it is the same module object)."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("apb_sparse.convert.compact")
