"""Interleaved timing: every variant is timed once per round, rounds repeated, medians reported."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Mapping

import torch


def interleaved_medians(fns: Mapping[str, Callable[[], object]], *, rounds: int = 10, warmup: int = 2,
                        min_time: float = 0.0, sync: Callable[[], None] = lambda: None,
                        clock: Callable[[], float] = time.perf_counter) -> Dict[str, dict]:
    """Time each callable once per round, in the same order every round, and summarise.

    Interleaving spreads slow drifts of the machine (other processes, frequency) over all variants
    instead of penalising whichever ran during them.

    Args:
        fns: name -> zero-argument callable.
        rounds: timed rounds.
        warmup: untimed rounds first.
        min_time: repeat a callable within a round until this many seconds passed (for very fast
            calls); the per-call time is reported.
        sync: called before reading the clock (e.g. ``torch.cuda.synchronize``).
        clock: seconds now: ``time.perf_counter`` (wall clock, default) or ``time.process_time``
            (CPU time of this process: on a machine shared with other jobs, a single-threaded
            model's CPU time excludes the slices the scheduler gave to others; meaningless for
            multi-threaded or GPU work, where it sums threads or misses the device).

    Returns:
        name -> ``{"median_s", "min_s", "max_s", "rounds", "times_s"}``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    times: Dict[str, List[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                sync()
                n, t0 = 0, clock()
                while True:
                    fn()
                    n += 1
                    sync()
                    elapsed = clock() - t0
                    if elapsed >= min_time:
                        break
                times[name].append(elapsed / n)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "rounds": len(v),
                "times_s": v} for k, v in times.items()}
