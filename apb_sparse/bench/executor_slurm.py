"""Cells as SLURM jobs submitted with submitit (:class:`SlurmExecutor`)."""
from __future__ import annotations

import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .executor_base import Executor, Outcome, Task


def submitit_available() -> bool:
    """True when ``import submitit`` works."""
    try:
        import submitit  # noqa: F401  (optional: the 'slurm' extra)
    except Exception:
        return False
    return True


def _run_task(fn: Callable[..., Any], args: Tuple) -> Dict[str, Any]:
    """What a SLURM job runs: ``fn(*args)``, with an exception it raises returned as data, so that
    a job without a result always means a job that died (time limit, node failure, scancel)."""
    try:
        return {"value": fn(*args)}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


class SlurmExecutor(Executor):
    """Cells as SLURM jobs, submitted with submitit (one job per task).

    The driver (``apb run``) stays on the login node (run it in tmux / screen, or submit it as a
    small CPU job itself); jobs run ``sys.executable`` there, so the nodes must see the same Python
    environment and the output folder (shared storage), as with Ray.

    Args:
        folder: where submitit writes job scripts, pickles and logs (``%j`` = job id).
        workers: jobs in the queue at once (default 32).
        partition, account, qos, constraint: ``sbatch`` options (``--partition`` ...); None: the
            cluster's default.
        time_min: time limit of one job in minutes (``--time``).
        gpus_per_cell, cpus_per_cell: GPUs and CPUs of one job (``--gpus-per-node``,
            ``--cpus-per-task``).
        mem_gb: memory of one job (None: the partition's default).
        max_retries: resubmissions of a job that ended without a result (not of a task that raised).
        cluster: ``"slurm"``; ``"local"`` runs the same jobs as processes on this machine
            (submitit's local executor: tests, and trying a configuration before queueing it).
        poll_s: seconds between checks of the running jobs.
        slurm_options: more ``sbatch`` options for submitit's ``slurm_additional_parameters``,
            e.g. ``{"reservation": "robustness"}``.
    """

    name = "slurm"

    def __init__(self, folder, *, workers: Optional[int] = None, partition: Optional[str] = None,
                 time_min: int = 24 * 60, gpus_per_cell: float = 0.0, cpus_per_cell: float = 1.0,
                 mem_gb: Optional[float] = None, account: Optional[str] = None, qos: Optional[str] = None,
                 constraint: Optional[str] = None, max_retries: int = 3, cluster: str = "slurm",
                 poll_s: float = 5.0, slurm_options: Optional[Dict[str, Any]] = None) -> None:
        if not submitit_available():
            raise RuntimeError("--executor slurm needs submitit: pip install submitit (or apb_sparse[slurm])")
        import submitit  # optional (the 'slurm' extra): imported on use

        if cluster not in ("slurm", "local"):
            raise ValueError(f"cluster must be 'slurm' or 'local', got {cluster!r}")
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise RuntimeError("--executor slurm: no `sbatch` on PATH; run apb on a SLURM login node "
                               "(or use --executor ray / local)")
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not isinstance(time_min, int) or time_min < 1:
            raise ValueError(f"time_min (--slurm-time) must be a positive number of minutes, got {time_min!r}")
        if gpus_per_cell < 0 or gpus_per_cell != int(gpus_per_cell):
            raise ValueError(f"gpus_per_cell must be a whole number >= 0 with --executor slurm (a job gets "
                             f"whole GPUs), got {gpus_per_cell}")
        if cpus_per_cell < 1 or cpus_per_cell != int(cpus_per_cell):
            raise ValueError(f"cpus_per_cell must be a whole number >= 1 with --executor slurm, got {cpus_per_cell}")
        if mem_gb is not None and not mem_gb > 0:
            raise ValueError(f"mem_gb must be > 0, got {mem_gb}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        self.folder = Path(folder)
        self.cluster = cluster
        self.workers = int(workers) if workers else 32
        self.max_retries = int(max_retries)
        self.poll_s = float(poll_s)
        self._ex = submitit.AutoExecutor(folder=str(self.folder), cluster=cluster)
        params: Dict[str, Any] = dict(name="apb", timeout_min=int(time_min), gpus_per_node=int(gpus_per_cell),
                                      cpus_per_task=int(cpus_per_cell), nodes=1, tasks_per_node=1)
        if mem_gb is not None:
            params["mem_gb"] = mem_gb
        slurm = {"partition": partition, "account": account, "qos": qos, "constraint": constraint}
        params.update({f"slurm_{k}": v for k, v in slurm.items() if v})
        if slurm_options:
            params["slurm_additional_parameters"] = dict(slurm_options)
        self._ex.update_parameters(**params)
        self.options = dict(partition=partition, time_min=int(time_min), gpus_per_cell=int(gpus_per_cell),
                            cpus_per_cell=int(cpus_per_cell), mem_gb=mem_gb)
        self._inflight: List[Tuple[Any, Task, int]] = []  # (job, task, attempt)

    def _submit(self, task: Task, attempt: int) -> None:
        job = self._ex.submit(_run_task, task.fn, tuple(task.args))
        self._inflight.append((job, task, attempt))

    def submit(self, task: Task) -> None:
        self._submit(task, 0)

    def running(self) -> int:
        return len(self._inflight)

    def next_done(self) -> Outcome:
        from submitit.core.utils import UncompletedJobError  # optional (the 'slurm' extra)

        if not self._inflight:
            raise RuntimeError("next_done() with no job in flight")
        while True:
            for i, (job, task, attempt) in enumerate(self._inflight):
                if not job.done():
                    continue
                del self._inflight[i]
                try:
                    out = job.result()
                except UncompletedJobError as e:  # died: time limit, node failure, OOM, scancel
                    reason = " ".join(str(e).split())[:500]
                    if attempt < self.max_retries:
                        self._submit(task, attempt + 1)
                        break
                    return Outcome(task, error=f"SLURM job {job.job_id} ended without a result "
                                               f"{attempt + 1} time(s): {reason}", traceback=str(e))
                if "error" in out:
                    return Outcome(task, error=out["error"], traceback=out.get("traceback", ""))
                return Outcome(task, value=out["value"])
            else:
                time.sleep(self.poll_s)

    def cancel_all(self) -> None:
        for job, _, _ in self._inflight:
            try:
                job.cancel(check=False)
            except Exception:  # pragma: no cover - already finished or gone
                pass
        self._inflight.clear()

    def describe(self) -> str:
        o = self.options
        where = "SLURM" + (f" partition {o['partition']}" if o["partition"] else "") if self.cluster == "slurm" \
            else "submitit's local executor (processes on this machine)"
        return (f"slurm executor: up to {self.workers} job(s) at a time on {where}, {o['gpus_per_cell']} GPU + "
                f"{o['cpus_per_cell']} CPU per cell, time limit {o['time_min']} min; job files in {self.folder}")
