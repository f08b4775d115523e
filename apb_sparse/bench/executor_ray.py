"""Cells as Ray tasks (:class:`RayExecutor`)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from .executor_base import Executor, Outcome, Task
from .ray_connect import DEFAULT_RAY_TIMEOUT_S, connect_ray, ray_available


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
        timeout_s: seconds to connect to ``address`` before :class:`RayConnectionError`
            (see :func:`connect_ray`).
    """

    name = "ray"

    def __init__(self, *, workers: Optional[int] = None, address: Optional[str] = None,
                 cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0, max_retries: int = 3,
                 num_cpus: Optional[int] = None, timeout_s: float = DEFAULT_RAY_TIMEOUT_S) -> None:
        if not ray_available():
            raise RuntimeError("--executor ray needs Ray: pip install 'ray>=2.9' (or apb_sparse[ray])")
        import ray  # optional (the 'ray' extra): imported on use

        if cpus_per_cell < 0 or gpus_per_cell < 0:
            raise ValueError(f"cpus_per_cell and gpus_per_cell must be >= 0, got {cpus_per_cell}, {gpus_per_cell}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s (--ray-timeout) must be > 0, got {timeout_s}")
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kw: Dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                                      configure_logging=True)
            if address:
                connect_ray(address, timeout_s=timeout_s, **kw)
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
