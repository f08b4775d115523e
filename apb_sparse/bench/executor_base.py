"""What every executor of ``apb run`` implements (:class:`Task` in, :class:`Outcome` out,
:class:`Executor`), and the in-process one, :class:`LocalExecutor`."""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple


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
        task = self._queue.pop(0)
        try:
            return Outcome(task, value=task.fn(*task.args))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a cell that fails for its own reasons
            return Outcome(task, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())

    def cancel_all(self) -> None:
        self._queue.clear()
