"""The benchmark behind ``apb run``: every method at every sparsity and seed, robustness and
measured speed of each pruned model, next to a dense reference trained with the same budget;
resumable, on one process or on a Ray cluster.

A *cell* is (method, arch, dataset, structure, sparsity, seed). For each cell not yet in
``OUT/results.jsonl``, an executor (``local``: this process; ``ray``: a Ray task on any worker,
see :mod:`apb_sparse.bench.executors`) runs :func:`run_cell`:

* the method prunes: pipeline A starts from the dense base model of (dataset, arch, seed), trained
  once before the cells that need it and shared through ``OUT/base/``; pipelines B/D start from
  the same initialisation with the same total epoch budget. The "dense" cell is the dense
  reference: adversarially trained from that initialisation for the same total budget;
* :func:`evaluate_model`: sparsity actually reached (``sparsity_report``) and the per-layer sparse
  paths; clean and robust accuracy (AutoAttack standard, or the preset's cheaper custom subset);
  minimum-norm FMN distances -> median distance and security curve, with the gradient-masking
  checks of ``apb_sparse.robustness.evaluate``; agreement of ``apb_sparse.sparsify``'s model with
  the dense-with-zeros model; state-dict sizes;
* the sparse checkpoint (nonzeros only) goes to ``OUT/checkpoints/``, the cell's log to
  ``OUT/logs/``, and the record back to the driver, which alone appends it to the JSONL file.

Latency is measured afterwards, by the driver, in one exclusive phase when no cell runs
(:func:`time_deployed`): all deployed models of the run interleaved with one dense baseline per
(dataset, arch). Then the leaderboard (Markdown, CSV, HTML) and plots are written.

Attacks run on the dense-with-zeros model (``densify``): it computes the same function as the
sparse one (checked on the attacked images) and uses the vendor kernels for the many backward
passes the attacks need.

This module gathers the benchmark's public names; each job lives in its own file:
:mod:`.prepare` (device, data, models, the dense base model), :mod:`.evaluate` (robustness and
everything measured on one model), :mod:`.latency` (latency of one pair and the timing phase),
:mod:`.budget` (training budgets), :mod:`.plan` (the cells of the grid), :mod:`.cell` (the task
functions of one cell) and :mod:`.grid` (the driver, :func:`run_benchmark`).
"""
from __future__ import annotations

# The private helpers stay importable from here as before the split (hence the noqa).
from .budget import lr_sum, training_budget
from .cell import _DATA_CACHE, _cached_data, _method_tags, _task_context, run_cell, train_base  # noqa: F401
from .evaluate import _evaluate_model, _predict, _quiet_autoattack, evaluate_model, quick_autoattack, robustness  # noqa: F401
from .grid import RunSummary, _check_run_config, _run_cells, run_benchmark  # noqa: F401
from .latency import _DATASET_SHAPES, LATENCY_BASELINE, _input_shape_of, _quantile, measure_latency, time_deployed  # noqa: F401
from .plan import DENSE, DENSE_BASE, REFERENCES, Cell, _unique, plan_cells  # noqa: F401
from .prepare import _base_path, build_model, get_base_model, load_data, make_recipe, resolve_device  # noqa: F401

__all__ = ["DENSE", "DENSE_BASE", "REFERENCES", "resolve_device", "load_data", "build_model", "make_recipe", "get_base_model",
           "quick_autoattack", "robustness", "measure_latency", "evaluate_model", "Cell",
           "plan_cells", "run_benchmark", "RunSummary", "run_cell", "train_base", "time_deployed",
           "lr_sum", "training_budget"]

