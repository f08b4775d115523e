"""Benchmark helpers shared by the scripts in benchmarks/ and the ``apb`` command."""
from .env import environment
from .timing import interleaved_medians

__all__ = ["environment", "interleaved_medians"]
