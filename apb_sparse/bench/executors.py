"""Where the cells of ``apb run`` execute: in this process (``local``) or as Ray tasks (``ray``).

Both executors run the same task functions (:func:`apb_sparse.bench.runner.run_cell` and
:func:`~apb_sparse.bench.runner.train_base`) and hand their return values back to the driver,
which alone writes ``results.jsonl``; so resume, fsync per cell and the refusal of a different
configuration do not depend on the executor.

Ray (https://docs.ray.io) is used as it is meant to be: a cell is a ``ray.remote`` task with
``num_cpus`` / ``num_gpus`` resources, a worker process that dies mid-task (OOM killer, SIGKILL,
a lost node) makes Ray rerun the task up to ``max_retries`` times, and an exception raised by the
task itself is not retried (it is a property of the cell, and the driver records it as failed).
We add no scheduler of our own beyond a cap on the tasks in flight (``workers``), which keeps
results streaming in grid order and lets the driver submit a pipeline-A cell only once its dense
base model is on disk.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

__all__ = ["Task", "Outcome", "Executor", "LocalExecutor", "RayExecutor", "make_executor", "EXECUTORS",
           "default_executor", "ray_available"]

EXECUTORS = ("local", "ray")


def ray_available() -> bool:
    """True when ``import ray`` works."""
    try:
        import ray  # noqa: F401
    except Exception:  # ImportError, or a broken install (e.g. psutil missing)
        return False
    return True


def default_executor() -> str:
    """``"ray"`` when Ray is installed and the machine has more than one CPU, else ``"local"``."""
    return "ray" if (os.cpu_count() or 1) > 1 and ray_available() else "local"


@dataclass
class Task:
    """One unit of work: ``fn(*args)`` run by the executor; ``key`` identifies it to the driver."""

    key: Any
    fn: Callable[..., Any]
    args: Tuple = ()
    label: str = ""


@dataclass
class Outcome:
    """What came back for a task: its return ``value``, or the ``error`` text (the task raised,
    or its worker died more often than ``max_retries``)."""

    task: Task
    value: Any = None
    error: Optional[str] = None
    traceback: str = ""


class Executor:
    """Runs :class:`Task` objects, at most ``workers`` at a time, and yields their outcomes."""

    name = "?"
    workers = 1

    def submit(self, task: Task) -> None:
        raise NotImplementedError

    def running(self) -> int:
        raise NotImplementedError

    def next_done(self) -> Outcome:
        """Block until one submitted task finished; return its outcome."""
        raise NotImplementedError

    def cancel_all(self) -> None:
        """Stop what is in flight (Ctrl-C of the driver)."""

    def shutdown(self) -> None:
        """Release the resources this executor acquired (a Ray cluster it started)."""

    def describe(self) -> str:
        return f"{self.name} executor, {self.workers} worker(s)"


class LocalExecutor(Executor):
    """Today's in-process loop: a task runs when the driver asks for its outcome."""

    name = "local"

    def __init__(self) -> None:
        self.workers = 1
        self._queue: List[Task] = []

    def submit(self, task: Task) -> None:
        if self._queue:
            raise RuntimeError("the local executor runs one task at a time")
        self._queue.append(task)

    def running(self) -> int:
        return len(self._queue)

    def next_done(self) -> Outcome:
        import traceback

        task = self._queue.pop(0)
        try:
            return Outcome(task, value=task.fn(*task.args))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a cell that fails for its own reasons
            return Outcome(task, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())

    def cancel_all(self) -> None:
        self._queue.clear()


class RayExecutor(Executor):
    """Cells as Ray tasks.

    Args:
        workers: tasks in flight at once; None: as many as the cluster's resources hold
            (CPUs / ``cpus_per_cell``, or GPUs / ``gpus_per_cell`` when cells ask for GPUs).
        address: an existing cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); None
            starts a local one (unless Ray is already initialised in this process, which is then
            used as it is and left running).
        cpus_per_cell, gpus_per_cell: Ray resources of one cell (``num_cpus`` / ``num_gpus``).
        max_retries: reruns of a task whose worker process died (not of a task that raised).
        num_cpus: CPUs of a local cluster started here (None: all of this machine).
    """

    name = "ray"

    def __init__(self, *, workers: Optional[int] = None, address: Optional[str] = None,
                 cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0, max_retries: int = 3,
                 num_cpus: Optional[int] = None) -> None:
        if not ray_available():
            raise RuntimeError("--executor ray needs Ray: pip install 'ray>=2.9' (or apb_sparse[ray])")
        import ray

        if cpus_per_cell < 0 or gpus_per_cell < 0:
            raise ValueError(f"cpus_per_cell and gpus_per_cell must be >= 0, got {cpus_per_cell}, {gpus_per_cell}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kw: Dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                                      configure_logging=True)
            if address:
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=num_cpus, **kw)
            self._started = True
        res = ray.cluster_resources()
        self.cluster = {k: float(v) for k, v in res.items() if k in ("CPU", "GPU")}
        if gpus_per_cell > self.cluster.get("GPU", 0.0):
            self.shutdown()
            raise ValueError(f"--gpus-per-cell {gpus_per_cell:g}: the Ray cluster has "
                             f"{self.cluster.get('GPU', 0.0):g} GPU(s)")
        if cpus_per_cell > self.cluster.get("CPU", 0.0):
            self.shutdown()
            raise ValueError(f"--cpus-per-cell {cpus_per_cell:g}: the Ray cluster has "
                             f"{self.cluster.get('CPU', 0.0):g} CPU(s)")
        fits = []
        if cpus_per_cell > 0:
            fits.append(int(self.cluster.get("CPU", 0.0) // cpus_per_cell))
        if gpus_per_cell > 0:
            fits.append(int(self.cluster.get("GPU", 0.0) // gpus_per_cell))
        capacity = max(1, min(fits) if fits else int(self.cluster.get("CPU", 1.0)))
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = int(workers) if workers else capacity
        self.options = dict(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell, max_retries=max_retries,
                            retry_exceptions=False)
        self._remote: Dict[Callable, Any] = {}
        self._inflight: Dict[Any, Task] = {}

    def _remote_fn(self, fn):
        if fn not in self._remote:
            self._remote[fn] = self._ray.remote(fn).options(**self.options)
        return self._remote[fn]

    def submit(self, task: Task) -> None:
        ref = self._remote_fn(task.fn).remote(*task.args)
        self._inflight[ref] = task

    def running(self) -> int:
        return len(self._inflight)

    def next_done(self) -> Outcome:
        ray = self._ray
        ready, _ = ray.wait(list(self._inflight), num_returns=1)
        ref = ready[0]
        task = self._inflight.pop(ref)
        try:
            return Outcome(task, value=ray.get(ref))
        except ray.exceptions.RayTaskError as e:  # the task raised: its own failure, not retried
            cause = e.cause if getattr(e, "cause", None) is not None else e
            return Outcome(task, error=f"{type(cause).__name__}: {cause}", traceback=str(e))
        except ray.exceptions.RayError as e:  # worker died more often than max_retries, node lost...
            return Outcome(task, error=f"{type(e).__name__}: {e}", traceback=str(e))

    def cancel_all(self) -> None:
        for ref in list(self._inflight):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # pragma: no cover - already finished or gone
                pass
        self._inflight.clear()

    def shutdown(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False

    def describe(self) -> str:
        cpu, gpu = self.cluster.get("CPU", 0.0), self.cluster.get("GPU", 0.0)
        return (f"ray executor, {self.workers} cell(s) at a time on a cluster of {cpu:g} CPU(s) / {gpu:g} GPU(s) "
                f"({self.options['num_cpus']:g} CPU + {self.options['num_gpus']:g} GPU per cell)")


def make_executor(name: str, *, workers: Optional[int] = None, address: Optional[str] = None,
                  cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0, max_retries: int = 3) -> Executor:
    """An executor by name ("local" or "ray"; "auto" = :func:`default_executor`)."""
    if name == "auto":
        name = default_executor()
    if name == "local":
        if workers not in (None, 1):
            raise ValueError(f"workers: the local executor runs one cell at a time, got {workers} "
                             "(use --executor ray for concurrent cells)")
        if address:
            raise ValueError("ray_address: only meaningful with --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(workers=workers, address=address, cpus_per_cell=cpus_per_cell,
                           gpus_per_cell=gpus_per_cell, max_retries=max_retries)
    raise ValueError(f"executor must be one of {('auto',) + EXECUTORS}, got {name!r}")
