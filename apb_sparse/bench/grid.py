"""The driver of ``apb run``: plan the grid, run the cells on an executor, store the records,
time the deployed models, write the leaderboard (:func:`run_benchmark`)."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import methods as registry
from .cell import run_cell, train_base
from .env import environment
from .executors import Executor, Task, make_executor
from .latency import time_deployed
from .leaderboard import write_leaderboard
from .plan import DENSE, DENSE_BASE, Cell, plan_cells
from .prepare import _base_path, resolve_device
from .presets import Preset
from .results import ResultsStore, atomic_write_text, cell_key


@dataclass
class RunSummary:
    out_dir: Path
    ran: List[Tuple] = field(default_factory=list)
    skipped: List[Tuple] = field(default_factory=list)
    failed: List[Tuple[Tuple, str]] = field(default_factory=list)
    seconds: float = 0.0
    files: Dict[str, str] = field(default_factory=dict)
    executor: str = "local"
    timed: int = 0
    timing_seconds: float = 0.0

def _check_run_config(out_dir: Path, preset: Preset) -> None:
    """Refuse to mix results of different configurations in one output folder."""
    path = out_dir / "run.json"
    identity = preset.identity()
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("identity_hash") != preset.identity_hash():
            diff = sorted(k for k in set(old.get("identity", {})) | set(identity)
                          if json.dumps(old.get("identity", {}).get(k), default=str, sort_keys=True)
                          != json.dumps(identity.get(k), default=str, sort_keys=True))
            raise ValueError(f"--out {out_dir} holds results of another configuration (differs in {diff}); "
                             "use another --out folder (or delete this one) to start over")
    else:
        atomic_write_text(path, json.dumps({"preset": preset.name, "identity_hash": preset.identity_hash(),
                                            "identity": identity}, indent=1, default=str))

# ----------------------------------------------------------------------------------- the driver
def run_benchmark(preset: Preset, out_dir, *, methods: Sequence[str], structures: Sequence[str],
                  sparsities: Dict[str, Sequence[float]], seeds: Sequence[int], archs: Sequence[str],
                  datasets: Sequence[str], data_dir: Optional[str] = None, device: str = "auto",
                  progress: bool = True, latency: bool = True, plots: bool = True,
                  log: Callable[[str], None] = print, executor: Any = "local",
                  workers: Optional[int] = None, ray_address: Optional[str] = None,
                  cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0, max_retries: int = 3) -> RunSummary:
    """Run (or resume) the benchmark grid and write results, checkpoints and the leaderboard.

    Args:
        executor: "local" (cells one after another in this process), "ray" (cells as Ray tasks,
            ``workers`` at a time), "auto" (Ray when installed on a multi-core machine), or an
            :class:`~apb_sparse.bench.executors.Executor` instance (left running).
        workers, ray_address, cpus_per_cell, gpus_per_cell, max_retries: see
            :class:`~apb_sparse.bench.executors.RayExecutor`.

    Phases: (1) the dense base model of every (dataset, arch, seed) with pipeline-A cells is trained
    once (concurrently across seeds) and saved in ``OUT/base/``; (2) the cells run, each
    pipeline-A cell as soon as its base is on disk, and the driver appends each returned record
    to ``OUT/results.jsonl`` (fsync); (3) the driver times every deployed model of the grid in one
    exclusive interleaved pass (:func:`time_deployed`) and appends the records again with their
    latency (the last record of a cell wins); (4) the leaderboard is written.
    A cell that raises is recorded in ``OUT/failed.jsonl`` and ``OUT/errors.log`` (and runs again
    on resume); Ctrl-C keeps every finished cell.
    """
    from tqdm.auto import tqdm  # optional ('bench' extra): imported on use

    t_start = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_run_config(out_dir, preset)
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if preset.threads:
        torch.set_num_threads(preset.threads)
    torch.set_flush_denormal(True)
    store = ResultsStore(out_dir / "results.jsonl")
    dropped = store.repair()
    if dropped:
        log(f"{store.path}: dropped {dropped} unreadable line(s) left by an interrupted write "
            f"(kept in {store.path}.bad); their cells run again")
    done = store.done()
    cells = plan_cells(preset, methods=methods, structures=structures, sparsities=sparsities, seeds=seeds,
                       archs=archs, datasets=datasets)
    todo = [c for c in cells if c.key not in done]
    summary = RunSummary(out_dir, skipped=[c.key for c in cells if c.key in done])

    own_executor = not isinstance(executor, Executor)
    ex = make_executor(executor, workers=workers, address=ray_address, cpus_per_cell=cpus_per_cell,
                       gpus_per_cell=gpus_per_cell, max_retries=max_retries) if own_executor else executor
    summary.executor = ex.name
    # The local executor trains here: check the device now. Ray tasks resolve it where they run
    # (a CPU-only driver may drive GPU workers); each record says which device it used.
    dev = resolve_device(device) if ex.name == "local" else device
    say = (lambda s: tqdm.write(s)) if progress else log
    try:
        env = environment()
        env["device"] = str(dev)  # for Ray: as requested; the record's "device" is what the task used
        config = {"preset": preset.to_dict(), "identity_hash": preset.identity_hash(), "device": str(dev),
                  "methods": list(methods), "structures": list(structures),
                  "sparsities": {k: list(v) for k, v in sparsities.items()}, "seeds": list(seeds),
                  "argv": sys.argv, "executor": ex.name, "workers": ex.workers}
        log(f"apb run --preset {preset.name}: {len(cells)} cells, {len(summary.skipped)} already in "
            f"{store.path}, {len(todo)} to run on {dev}; {ex.describe()}; per-cell logs in {out_dir / 'logs'}")

        _run_cells(todo, preset, out_dir, store, summary, ex, config=config, env=env, dev=dev,
                   data_dir=data_dir, progress=progress, say=say)

        if latency:
            latest = store.latest()
            planned = [latest[c.key] for c in cells if c.key in latest]
            if planned and (summary.ran or any("latency" not in r for r in planned)):
                t0 = time.perf_counter()
                timings = time_deployed(planned, out_dir, preset, log=say)
                for r in planned:
                    lat = timings.get(cell_key(r))
                    if lat is None:
                        continue
                    r = dict(r, latency=lat, flags=[f for f in r.get("flags", []) if f != "latency-output-mismatch"]
                             + ([] if lat["cpu"].get("outputs_match", True) else ["latency-output-mismatch"]))
                    store.append(r)
                summary.timed = len(timings)
                summary.timing_seconds = time.perf_counter() - t0
    except KeyboardInterrupt:
        ex.cancel_all()
        raise
    finally:
        if own_executor:
            ex.shutdown()
    summary.files = write_leaderboard(store.records(), out_dir, plots=plots)
    summary.seconds = time.perf_counter() - t_start
    return summary


def _run_cells(todo: List[Cell], preset, out_dir: Path, store: ResultsStore, summary: RunSummary, ex, *,
               config, env, dev, data_dir, progress, say) -> None:
    """Phases 1 and 2: base models, then cells (a pipeline-A cell once its base is on disk)."""
    from tqdm.auto import tqdm  # optional ('bench' extra): imported on use

    def needs_base(c: Cell) -> bool:
        return c.method == DENSE_BASE or (c.method != DENSE and registry.get(c.method).tags.pipeline == "A")

    bases_needed = []
    for c in todo:
        g = (c.dataset, c.arch, c.seed)
        if needs_base(c) and g not in bases_needed:
            bases_needed.append(g)
    base_ready = {g for g in bases_needed
                  if _base_path(out_dir, preset, g[1], g[0], g[2]).is_file()
                  and _base_path(out_dir, preset, g[1], g[0], g[2]).with_suffix(".json").is_file()}
    base_failed: Dict[Tuple, str] = {}
    queue: List[Task] = [Task(("base", g), train_base, (preset, g[1], g[0], g[2], str(out_dir), data_dir, str(dev)),
                              f"base {g[0]}/{g[1]} seed {g[2]}") for g in bases_needed if g not in base_ready]
    queue += [Task(("cell", c), run_cell, (preset, c, str(out_dir), data_dir, str(dev), config, env),
                   f"{c.method} {c.structure[:2]} s={c.sparsity:g} seed {c.seed}") for c in todo]
    bar = tqdm(total=len(todo), desc="cells", disable=not progress, dynamic_ncols=True, unit="cell")

    def ready(task: Task) -> bool:
        kind, obj = task.key
        if kind == "base":
            return True
        g = (obj.dataset, obj.arch, obj.seed)
        return not needs_base(obj) or g in base_ready or g in base_failed

    def fail(cell: Cell, err: str, tb: str) -> None:
        summary.failed.append((cell.key, err))
        with open(out_dir / "errors.log", "a") as f:
            f.write(f"== {cell.id} ({time.strftime('%Y-%m-%d %H:%M:%S')}) ==\n{tb or err}\n")
        rec = {"method": cell.method, "arch": cell.arch, "dataset": cell.dataset, "structure": cell.structure,
               "sparsity": cell.sparsity, "seed": cell.seed, "error": err, "time_utc": env.get("time_utc")}
        ResultsStore(out_dir / "failed.jsonl").append(rec)
        say(f"FAILED {cell.id}: {err} (traceback in {out_dir / 'errors.log'}, log in {out_dir / 'logs' / (cell.id + '.log')})")

    def postfix() -> None:
        bar.set_postfix_str(f"running {ex.running()}, failed {len(summary.failed)}")

    try:
        while queue or ex.running():
            while ex.running() < ex.workers:
                nxt = next((t for t in queue if ready(t)), None)
                if nxt is None:
                    break
                queue.remove(nxt)
                kind, obj = nxt.key
                if kind == "cell" and needs_base(obj) and (obj.dataset, obj.arch, obj.seed) in base_failed:
                    fail(obj, f"dense base model failed: {base_failed[(obj.dataset, obj.arch, obj.seed)]}", "")
                    bar.update(1)
                    continue
                ex.submit(nxt)
                postfix()
            if not ex.running():
                if queue:  # pragma: no cover - every task becomes ready once the bases are done
                    raise RuntimeError(f"no runnable task among {[t.label for t in queue]}")
                break
            outcome = ex.next_done()
            kind, obj = outcome.task.key
            if kind == "base":
                if outcome.error:
                    base_failed[obj] = outcome.error
                    with open(out_dir / "errors.log", "a") as f:
                        f.write(f"== base {obj} ==\n{outcome.traceback or outcome.error}\n")
                    say(f"FAILED dense base {obj}: {outcome.error}")
                else:
                    base_ready.add(obj)
                    say(f"[base] {obj[0]}/{obj[1]} seed {obj[2]}: ready ({outcome.value.get('epochs')} epochs, "
                        f"{outcome.value.get('train_seconds') or 0:.1f} s)")
                postfix()
                continue
            cell = obj
            if outcome.error:
                fail(cell, outcome.error, outcome.traceback)
            else:
                record = outcome.value
                record["config"] = config  # the driver's view (executor, workers) for every record
                store.append(record)
                summary.ran.append(cell.key)
                msg = (f"{cell.method:<11} {cell.structure:<12} s={cell.sparsity:<5g} seed {cell.seed}  clean "
                       f"{100 * record['clean_accuracy']:5.1f}%  AA {100 * record['robust_accuracy']:5.1f}%  "
                       f"d_med {record['min_norm']['median_distance']:.3f}  ({record['seconds']['cell']:.1f} s)"
                       f"{'  [' + ' '.join(record['flags']) + ']' if record['flags'] else ''}")
                say(msg)
                try:
                    write_leaderboard(store.records(), out_dir, plots=False)
                except Exception as e:  # pragma: no cover - never lose the run to a report bug
                    say(f"leaderboard not written: {e}")
            bar.update(1)
            postfix()
    finally:
        bar.close()
