"""Where the cells of ``apb run`` execute: in this process (``local``), as Ray tasks (``ray``), or
as SLURM jobs submitted with submitit (``slurm``).

Every executor runs the same task functions (:func:`apb_sparse.bench.runner.run_cell` and
:func:`~apb_sparse.bench.runner.train_base`) and hands their return values back to the driver,
which alone writes ``results.jsonl``; so resume, fsync per cell and the refusal of a different
configuration do not depend on the executor.

Ray (https://docs.ray.io) is used as it is meant to be: a cell is a ``ray.remote`` task with
``num_cpus`` / ``num_gpus`` resources, a worker process that dies mid-task (OOM killer, SIGKILL,
a lost node) makes Ray rerun the task up to ``max_retries`` times, and an exception raised by the
task itself is not retried (it is a property of the cell, and the driver records it as failed).
We add no scheduler of our own beyond a cap on the tasks in flight (``workers``), which keeps
results streaming in grid order and lets the driver submit a pipeline-A cell only once its dense
base model is on disk.  Connecting to a cluster is bounded (``timeout_s``) and understands Ray's
token authentication (on by default for ``ray start --head`` since Ray 2.5x): see
:func:`connect_ray`.

SLURM is driven through submitit (https://github.com/facebookincubator/submitit), as FAIR-style
research code does: one job per task, ``sbatch`` parameters from the executor's options, the same
retry rule (a job that died without a result is resubmitted up to ``max_retries`` times, a task
that raised is recorded as failed).  submitit's ``local`` cluster runs the same jobs as local
processes, which is how it is tested without SLURM.

This module picks and builds an executor (:func:`make_executor`) and gathers the executors'
public names; each job lives in its own file: :mod:`.executor_base` (the interface and the local
executor), :mod:`.ray_connect` (reaching a Ray cluster), :mod:`.executor_ray`,
:mod:`.executor_slurm` and :mod:`.interrupt` (Ctrl-C of the driver).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

# The private helpers stay importable from here as before the split (hence the noqa).
from .executor_base import Executor, LocalExecutor, Outcome, Task
from .executor_ray import RayExecutor
from .executor_slurm import SlurmExecutor, _run_task, submitit_available  # noqa: F401
from .interrupt import _force_exit, interrupt_guard  # noqa: F401
from .ray_connect import (_GCS_PROBE, _TOKEN_HELP, DEFAULT_RAY_TIMEOUT_S, RayConnectionError,  # noqa: F401
                          _enable_token_mode, _probe_gcs, _probe_tcp, _ray_auth, _ray_env, _split_host_port,
                          _token_source, connect_ray, ray_available)

__all__ = ["Task", "Outcome", "Executor", "LocalExecutor", "RayExecutor", "SlurmExecutor", "make_executor",
           "EXECUTORS", "default_executor", "ray_available", "submitit_available", "connect_ray",
           "RayConnectionError", "interrupt_guard", "DEFAULT_RAY_TIMEOUT_S"]

EXECUTORS = ("local", "ray", "slurm")


def default_executor() -> str:
    """``"ray"`` when Ray is installed and the machine has more than one CPU, else ``"local"``."""
    return "ray" if (os.cpu_count() or 1) > 1 and ray_available() else "local"


def make_executor(name: str, *, workers: Optional[int] = None, address: Optional[str] = None,
                  cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0, max_retries: int = 3,
                  ray_timeout: float = DEFAULT_RAY_TIMEOUT_S, folder=None, slurm: Optional[Dict[str, Any]] = None,
                  ) -> Executor:
    """An executor by name ("local", "ray" or "slurm"; "auto" = :func:`default_executor`).

    Args:
        workers, address, cpus_per_cell, gpus_per_cell, max_retries: see :class:`RayExecutor`
            (``workers``, the resources and ``max_retries`` apply to :class:`SlurmExecutor` too).
        ray_timeout: :class:`RayExecutor`'s ``timeout_s``.
        folder: :class:`SlurmExecutor`'s job folder (default ``./apb-slurm/%j``).
        slurm: more :class:`SlurmExecutor` options (``partition``, ``time_min``, ``mem_gb``,
            ``account``, ``qos``, ``constraint``, ``cluster``, ``poll_s``, ``slurm_options``).
    """
    if name == "auto":
        name = default_executor()
    if name != "slurm" and slurm:
        raise ValueError(f"slurm options {sorted(slurm)}: only meaningful with --executor slurm")
    if name != "ray" and address:
        raise ValueError("ray_address: only meaningful with --executor ray")
    if name == "local":
        if workers not in (None, 1):
            raise ValueError(f"workers: the local executor runs one cell at a time, got {workers} "
                             "(use --executor ray or slurm for concurrent cells)")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(workers=workers, address=address, cpus_per_cell=cpus_per_cell,
                           gpus_per_cell=gpus_per_cell, max_retries=max_retries, timeout_s=ray_timeout)
    if name == "slurm":
        return SlurmExecutor(folder if folder is not None else Path("apb-slurm") / "%j", workers=workers,
                             gpus_per_cell=gpus_per_cell, cpus_per_cell=cpus_per_cell, max_retries=max_retries,
                             **(slurm or {}))
    raise ValueError(f"executor must be one of {('auto',) + EXECUTORS}, got {name!r}")
