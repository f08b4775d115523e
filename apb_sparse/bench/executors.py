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
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

__all__ = ["Task", "Outcome", "Executor", "LocalExecutor", "RayExecutor", "SlurmExecutor", "make_executor",
           "EXECUTORS", "default_executor", "ray_available", "submitit_available", "connect_ray",
           "RayConnectionError", "interrupt_guard", "DEFAULT_RAY_TIMEOUT_S"]

EXECUTORS = ("local", "ray", "slurm")
# Seconds to reach a Ray cluster before giving up (Ray's own retries last about 12 minutes).
DEFAULT_RAY_TIMEOUT_S = 60.0


def ray_available() -> bool:
    """True when ``import ray`` works."""
    try:
        import ray  # noqa: F401
    except Exception:  # ImportError, or a broken install (e.g. psutil missing)
        return False
    return True


def submitit_available() -> bool:
    """True when ``import submitit`` works."""
    try:
        import submitit  # noqa: F401
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------------- Ray connection
class RayConnectionError(ConnectionError):
    """A Ray cluster that cannot be used: unreachable, not answering, or refusing our token.
    The message names the address and says what to do."""


_TOKEN_HELP = ("copy the head node's token (run `ray get-auth-token` there, or read its ~/.ray/auth_token) "
               "to this machine as ~/.ray/auth_token, or export RAY_AUTH_TOKEN=<token> "
               "(or RAY_AUTH_TOKEN_PATH=<file holding it>)")


def _token_source() -> Optional[str]:
    """Where Ray would read an authentication token from (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token, in Ray's order), or None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH={path}" if Path(path).expanduser().is_file() else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def _enable_token_mode() -> None:
    """Token authentication for this process (and the processes it starts), as ``ray.init``
    does by itself only for ``address="auto"``."""
    try:  # Ray's own switch also refreshes its cached config if Ray already read it
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
        _enable_token_auth()
    except Exception:  # another Ray version: the environment variable is the documented switch
        os.environ["RAY_AUTH_MODE"] = "token"


def _ray_auth(address: str) -> Tuple[str, Optional[str]]:
    """Decide the authentication mode for connecting to ``address``; return (mode, token source).

    RAY_AUTH_MODE set by the user is respected. Unset, token mode is switched on when a token is
    available (a cluster without authentication accepts a token too, measured with Ray 2.60), so
    the README's recipe works without knowing about RAY_AUTH_MODE.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    source = _token_source()
    if mode is None:
        if source is None:
            return "disabled", None
        _enable_token_mode()
        return "token", source
    if mode.lower() == "token" and source is None:
        # Ray itself aborts the process (a failed C++ check) in this state.
        raise RayConnectionError(f"--ray-address {address}: RAY_AUTH_MODE=token is set but no Ray "
                                 f"authentication token was found; {_TOKEN_HELP}")
    return mode.lower(), source


def _split_host_port(address: str, default_port: int) -> Tuple[str, int]:
    hostport = address.split("://", 1)[-1].rstrip("/")
    if hostport.startswith("["):  # [IPv6]:port
        host, _, rest = hostport[1:].partition("]")
        port = rest.lstrip(":")
    elif hostport.count(":") == 1:
        host, port = hostport.split(":")
    else:
        host, port = hostport, ""
    try:
        port_n = int(port) if port else default_port
    except ValueError:
        raise RayConnectionError(f"--ray-address {address!r}: expected HOST:PORT (e.g. 10.0.0.1:6379), "
                                 f"'auto' or ray://HOST:10001") from None
    if not host or not 0 < port_n < 65536:
        raise RayConnectionError(f"--ray-address {address!r}: expected HOST:PORT (e.g. 10.0.0.1:6379), "
                                 f"'auto' or ray://HOST:10001")
    return host, port_n


def _probe_tcp(address: str, host: str, port: int, deadline: float, timeout_s: float) -> None:
    """Open a TCP connection to host:port, retrying until ``deadline`` (a head that is still
    starting); pure Python with short waits, so Ctrl-C stops it at once."""
    last = "no attempt"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RayConnectionError(
                f"no Ray cluster reachable at {address} within {timeout_s:g} s (--ray-timeout): connecting to "
                f"{host}:{port} failed ({last}). Is the head running (`ray start --head --port={port}`), is the "
                "address the head's IP and GCS port, and does the firewall let this machine reach it?")
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(left, 0.05))):
                return
        except OSError as e:
            last = e.strerror or type(e).__name__
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))


# Run in a child process: the C++ GCS client blocks for ~35 s per attempt on a port that does not
# answer and ignores Ctrl-C meanwhile; a child can be abandoned at the deadline.
_GCS_PROBE = """
import sys
try:
    from ray._raylet import GcsClient
    GcsClient(address=sys.argv[1]).cluster_id
except Exception as e:
    kind = "auth" if type(e).__name__ == "AuthenticationError" else "error"
    print(kind + ":" + type(e).__name__ + ": " + " ".join(str(e).split())[:400], flush=True)
    sys.exit(3)
print("ok", flush=True)
"""


def _probe_gcs(address: str, target: str, deadline: float, timeout_s: float, mode: str,
               source: Optional[str]) -> None:
    """Ask the GCS at ``target`` for its cluster id (what ``ray.init`` does first), in a child
    process bounded by ``deadline``; turn a refused token into instructions."""
    left = max(deadline - time.monotonic(), 1.0)
    proc = subprocess.Popen([sys.executable, "-c", _GCS_PROBE, target], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=left)
    except subprocess.TimeoutExpired:
        raise RayConnectionError(
            f"the Ray cluster at {address} did not answer within {timeout_s:g} s (--ray-timeout): "
            f"{target} accepts TCP connections but no Ray GCS replied. Is it the head's GCS port "
            "(6379 unless `ray start --head --port` said otherwise; not the dashboard's 8265 or the "
            "client server's 10001, which needs ray://HOST:10001)?") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    line = (out or "").strip().splitlines()[-1:] or [""]
    line = line[0]
    if proc.returncode == 0 and line == "ok":
        return
    if line.startswith("auth:"):
        if mode != "token":
            raise RayConnectionError(
                f"the Ray cluster at {address} requires token authentication (Ray >= 2.5x turns it on with "
                f"`ray start --head`) and this machine has no token"
                f"{' (RAY_AUTH_MODE=' + mode + ' is set)' if os.environ.get('RAY_AUTH_MODE') else ''}: "
                f"{_TOKEN_HELP}; then rerun")
        raise RayConnectionError(
            f"the Ray cluster at {address} refused the authentication token from {source}: it is not the "
            f"token the head was started with; {_TOKEN_HELP}")
    detail = line.split(":", 1)[-1].strip() or f"exit code {proc.returncode}"
    raise RayConnectionError(f"cannot connect to the Ray cluster at {address}: {detail}")


@contextlib.contextmanager
def _ray_env(overrides: Dict[str, str]):
    old = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def connect_ray(address: str, *, timeout_s: float = DEFAULT_RAY_TIMEOUT_S, **init_kwargs) -> str:
    """``ray.init(address=...)`` that fails within ``timeout_s`` with a message naming the address.

    Steps, all bounded by one deadline and interruptible with Ctrl-C: resolve ``"auto"`` (the
    cluster ``ray start`` left on this machine); decide token authentication (:func:`_ray_auth`);
    open a TCP connection to the head; ask its GCS for the cluster id in a child process (a refused
    token gives instructions instead of Ray's retries); then ``ray.init``.

    Args:
        address: ``"HOST:PORT"`` (the head's GCS port, 6379 by default), ``"auto"`` or
            ``"ray://HOST:10001"`` (Ray Client; only the TCP step is checked).
        timeout_s: seconds for all of it.
        **init_kwargs: passed to ``ray.init``.

    Returns:
        The address connected to.

    Raises:
        RayConnectionError: unreachable, not a Ray GCS, or authentication refused.
    """
    import ray

    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    deadline = time.monotonic() + timeout_s
    target = address
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die
            target = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as e:
            raise RayConnectionError(f"--ray-address auto: {e} (start one with `ray start --head`, or pass "
                                     "--ray-address HEAD_IP:6379)") from None
        except ImportError:  # pragma: no cover - another Ray version: let ray.init resolve it
            target = address
    mode, source = _ray_auth(address)
    client = target.startswith("ray://")
    if target != "auto":
        host, port = _split_host_port(target, 10001 if client else 6379)
        _probe_tcp(address, host, port, deadline, timeout_s)
        if not client:
            _probe_gcs(address, target, deadline, timeout_s, mode, source)
    # The probes passed, so ray.init should connect at once; bound its own retry loop too (one
    # attempt per second) in case the head goes away in between.
    left = max(int(deadline - time.monotonic()), 1)
    with _ray_env({"RAY_gcs_server_port_wait_time_s": str(left)}):
        try:
            ray.init(address=target, **init_kwargs)
        except ConnectionError as e:
            raise RayConnectionError(f"cannot connect to the Ray cluster at {address}: {e}") from None
    return target


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
        timeout_s: seconds to connect to ``address`` before :class:`RayConnectionError`
            (see :func:`connect_ray`).
    """

    name = "ray"

    def __init__(self, *, workers: Optional[int] = None, address: Optional[str] = None,
                 cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0, max_retries: int = 3,
                 num_cpus: Optional[int] = None, timeout_s: float = DEFAULT_RAY_TIMEOUT_S) -> None:
        if not ray_available():
            raise RuntimeError("--executor ray needs Ray: pip install 'ray>=2.9' (or apb_sparse[ray])")
        import ray

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


def _run_task(fn: Callable[..., Any], args: Tuple) -> Dict[str, Any]:
    """What a SLURM job runs: ``fn(*args)``, with an exception it raises returned as data, so that
    a job without a result always means a job that died (time limit, node failure, scancel)."""
    import traceback

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
        import submitit

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
        from submitit.core.utils import UncompletedJobError

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


# ----------------------------------------------------------------------------------- Ctrl-C
@contextlib.contextmanager
def interrupt_guard(grace_s: float = 10.0, *, message: str = "apb: interrupted") -> Iterator[None]:
    """Make Ctrl-C stop this process even while it is blocked in native code.

    Python runs its SIGINT handler (``KeyboardInterrupt``) only between bytecodes of the main
    thread, so a driver blocked in a C++ call (Ray's GCS client waits ~35 s per attempt) does not
    react.  The C-level handler does write the signal number to the wakeup fd at once, though: a
    watcher thread reading it forces the exit (code 130) when a second Ctrl-C comes, or when the
    process is still alive ``grace_s`` seconds after the first one.  The first Ctrl-C still raises
    ``KeyboardInterrupt`` as usual, so normal cleanup (cancelling tasks, keeping finished results)
    happens whenever the main thread can run.

    Does nothing outside the main thread or when Python's SIGINT handler is not the default one.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    rfd, wfd = socket.socketpair()
    rfd.setblocking(True)
    wfd.setblocking(False)
    try:
        old = signal.set_wakeup_fd(wfd.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):  # pragma: no cover
        rfd.close()
        wfd.close()
        yield
        return
    stop = threading.Event()

    def watch() -> None:
        first: Optional[float] = None
        rfd.settimeout(0.5)
        while not stop.is_set():
            try:
                data = rfd.recv(64)
            except socket.timeout:
                data = b""
            except OSError:
                return
            if stop.is_set():
                return
            if signal.SIGINT in data:
                if first is not None:
                    _force_exit(f"{message} (second Ctrl-C)")
                first = time.monotonic()
            if first is not None and time.monotonic() - first > grace_s:
                _force_exit(f"{message} (the driver did not stop within {grace_s:g} s of Ctrl-C)")

    watcher = threading.Thread(target=watch, name="apb-interrupt-guard", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        signal.set_wakeup_fd(old)
        watcher.join(timeout=2)
        rfd.close()
        wfd.close()


def _force_exit(message: str) -> None:
    try:
        sys.stderr.write(f"\n{message}; finished cells are kept, rerun the same command to resume\n")
        sys.stderr.flush()
    finally:
        os._exit(130)


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
