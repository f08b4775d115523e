"""``apb run`` on Ray: the same cells and bit-identical accuracies as the local executor, a worker
SIGKILLed mid-cell neither loses nor duplicates a cell, a killed driver resumes.

One local Ray cluster (2 CPUs, no dashboard) is shared by the module; every grid is a handful of
cells of a 4-channel small_cnn on 128 training digits. Skipped when Ray is not installed.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from apb_sparse.bench.presets import Preset  # noqa: E402
from apb_sparse.bench.results import cell_key, read_records  # noqa: E402
from apb_sparse.bench.runner import run_benchmark  # noqa: E402

TINY = Preset(name="tiny", description="test", datasets=("digits",), archs=("small_cnn",),
              model_kwargs={"width": 4}, sparsities={"unstructured": (0.9,)}, base_epochs=1, prune_epochs=0,
              finetune_epochs=1, recipe=dict(mode="pgd", steps=1, batch_size=64, lr=0.05, finetune_lr=0.02),
              train_subset=128, eps=0.1, attack="quick", aa_samples=16, aa_iters=3, aa_targets=1, fmn_samples=8,
              fmn_steps=5, curve_max=0.3, check_samples=8, square_queries=5, latency_batch=4, latency_rounds=2,
              latency_min_time=0.005, eval_batch=64, device="cpu", threads=1)

GRID = dict(structures=["unstructured"], sparsities={"unstructured": [0.9]}, seeds=[0], archs=["small_cnn"],
            datasets=["digits"], progress=False, plots=False, log=lambda s: None)


@pytest.fixture(scope="module")
def cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def _keys(path):
    return [cell_key(r) for r in read_records(path, warn=False)]


def _by_key(path):
    return {cell_key(r): r for r in read_records(path, warn=False)}


def test_ray_runs_the_same_cells_with_bit_identical_accuracies(cluster, tmp_path):
    methods = ["random", "lwm_local", "rst"]  # pipeline A (shared base) and B (from scratch)
    local = run_benchmark(TINY, tmp_path / "local", methods=methods, latency=False, executor="local", **GRID)
    par = run_benchmark(TINY, tmp_path / "ray", methods=methods, latency=True, executor="ray", workers=2, **GRID)
    assert not local.failed and not par.failed, (local.failed, par.failed)
    assert local.executor == "local" and par.executor == "ray"
    a, b = _by_key(tmp_path / "local" / "results.jsonl"), _by_key(tmp_path / "ray" / "results.jsonl")
    # dense + 3 methods (+ the reference rows the runner adds, e.g. the dense base's own row)
    assert set(a) == set(b) and len(a) >= 4
    for k in a:
        for field in ("clean_accuracy", "robust_accuracy", "measured_sparsity"):
            assert a[k][field] == b[k][field], (k, field)
        assert a[k]["min_norm"]["distances"] == b[k]["min_norm"]["distances"], k
        assert a[k]["config"]["executor"] == "local" and b[k]["config"]["executor"] == "ray"
    # the dense base of the pipeline-A cells was trained once and shared
    assert len(list((tmp_path / "ray" / "base").glob("*.safetensors"))) == 1
    # latency from the exclusive phase, with its spread, for every cell
    for r in b.values():
        cpu = r["latency"]["cpu"]
        assert cpu["phase"] == "exclusive" and cpu["models_timed"] >= 4 and cpu["outputs_match"]
        assert cpu["speedup_q25"] <= cpu["speedup_q75"]
    # the cells ran in two different worker processes, their logs are files in the run folder
    assert len({r["worker"]["pid"] for r in b.values()}) == 2
    assert len(list((tmp_path / "ray" / "logs").glob("*.log"))) >= 5  # 4 cells + the base


def _watch_and_kill(log_dir: Path, stop: threading.Event, killed: list) -> None:
    """SIGKILL the worker process of the first cell (not the base) that starts."""
    while not stop.is_set() and not killed:
        for log in sorted(log_dir.glob("*.log")) if log_dir.is_dir() else []:
            if log.name.startswith("base-"):
                continue
            m = re.search(r"pid=(\d+)", log.read_text())
            if m:
                os.kill(int(m.group(1)), signal.SIGKILL)
                killed.append((log.stem, int(m.group(1))))
                return
        time.sleep(0.02)


def test_worker_killed_mid_cell_is_retried_without_loss_or_duplicate(cluster, tmp_path):
    out = tmp_path / "run"
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_watch_and_kill, args=(out / "logs", stop, killed), daemon=True)
    watcher.start()
    try:
        s = run_benchmark(TINY, out, methods=["random", "rst"], latency=False, executor="ray", workers=2,
                          max_retries=2, **GRID)
    finally:
        stop.set()
        watcher.join()
    assert killed, "no cell was seen starting"
    assert not s.failed, s.failed
    keys = _keys(out / "results.jsonl")
    assert len(keys) == len(set(keys)) >= 3  # dense, random, rst (+ reference rows): each exactly once
    cell, _ = killed[0]
    log = (out / "logs" / f"{cell}.log").read_text()
    assert log.count("=== ") == 2  # the first attempt died with its worker, Ray ran it again


DRIVER = textwrap.dedent("""
    import sys
    from apb_sparse.bench.runner import run_benchmark
    sys.path.insert(0, {tests!r})
    from test_ray import TINY, GRID
    run_benchmark(TINY, {out!r}, methods=["random", "lwm_local", "rst", "hydra"], latency=False, executor="ray",
                  workers=1, ray_address={address!r}, **GRID)
""")


def test_resume_after_the_driver_is_killed(cluster, tmp_path):
    out = tmp_path / "run"
    code = DRIVER.format(tests=str(Path(__file__).parent), out=str(out), address=cluster)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.is_file() and results.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    before = _keys(results)
    assert len(before) >= 1
    s = run_benchmark(TINY, out, methods=["random", "lwm_local", "rst", "hydra"], latency=False, executor="ray",
                      workers=2, **GRID)
    assert not s.failed, s.failed
    total = len(s.skipped) + len(s.ran)
    assert set(s.skipped) == set(before) and total >= 5 and len(before) < total
    keys = _keys(results)
    assert len(keys) == len(set(keys)) == total
    # a second resume has nothing left to do
    s2 = run_benchmark(TINY, out, methods=["random", "lwm_local", "rst", "hydra"], latency=False, executor="ray",
                       workers=2, **GRID)
    assert s2.ran == [] and len(s2.skipped) == total


def test_a_cell_that_raises_is_recorded_as_failed_and_the_run_goes_on(cluster, tmp_path):
    """width 0 makes every model build raise: the dense cell fails for its own reason (not
    retried), the base of 'random' fails and so does the cell waiting for it; the run completes
    and names both."""
    out = tmp_path / "run"
    s = run_benchmark(TINY.with_overrides(model_kwargs={"width": 0}), out, methods=["random"], latency=False,
                      executor="ray", workers=2, max_retries=1, **GRID)
    # (+ the runner's reference rows, e.g. the dense base's own row, which fail with the base)
    assert not s.ran and {"dense", "random"} <= {k[0] for k, _ in s.failed}
    failed = read_records(out / "failed.jsonl", warn=False)
    assert {"dense", "random"} <= {r["method"] for r in failed}
    assert all("width" in r["error"] for r in failed), failed
    assert "dense" in (out / "errors.log").read_text()
    assert not (out / "results.jsonl").exists() or not read_records(out / "results.jsonl", warn=False)
