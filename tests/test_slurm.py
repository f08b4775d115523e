"""``apb run --executor slurm`` through submitit's local executor (the same job files and pickles as
on SLURM, run as processes here): the same cells and bit-identical accuracies as the local
executor, resume, a job that dies is resubmitted and one whose task raised is not, and the CLI's
SLURM options. Skipped when submitit is not installed."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("submitit")

from apb_sparse.bench.executors import SlurmExecutor, Task, make_executor  # noqa: E402
from apb_sparse.bench.presets import Preset  # noqa: E402
from apb_sparse.bench.results import cell_key, read_records  # noqa: E402
from apb_sparse.bench.runner import run_benchmark  # noqa: E402
from apb_sparse.cli import main  # noqa: E402

# The grid of tests/test_ray.py: a 4-channel small_cnn on 128 training digits.
TINY = Preset(name="tiny", description="test", datasets=("digits",), archs=("small_cnn",),
              model_kwargs={"width": 4}, sparsities={"unstructured": (0.9,)}, base_epochs=1, prune_epochs=0,
              finetune_epochs=1, recipe=dict(mode="pgd", steps=1, batch_size=64, lr=0.05, finetune_lr=0.02),
              train_subset=128, eps=0.1, attack="quick", aa_samples=16, aa_iters=3, aa_targets=1, fmn_samples=8,
              fmn_steps=5, curve_max=0.3, check_samples=8, square_queries=5, latency_batch=4, latency_rounds=2,
              latency_min_time=0.005, eval_batch=64, device="cpu", threads=1)
GRID = dict(structures=["unstructured"], sparsities={"unstructured": [0.9]}, seeds=[0], archs=["small_cnn"],
            datasets=["digits"], progress=False, plots=False, log=lambda s: None)


def _by_key(path):
    return {cell_key(r): r for r in read_records(path, warn=False)}


def _local_slurm(folder, **kw):
    return SlurmExecutor(folder / "%j", cluster="local", workers=2, poll_s=0.2, time_min=10, **kw)


def test_slurm_runs_the_same_cells_with_bit_identical_accuracies_and_resumes(tmp_path):
    methods = ["random"]  # pipeline A: its dense base is a job of its own, the cells wait for it
    local = run_benchmark(TINY, tmp_path / "local", methods=methods, latency=False, executor="local", **GRID)
    ex = _local_slurm(tmp_path / "slurm" / "jobs")
    try:
        par = run_benchmark(TINY, tmp_path / "slurm", methods=methods, latency=False, executor=ex, **GRID)
    finally:
        ex.shutdown()
    assert not local.failed and not par.failed, (local.failed, par.failed)
    assert par.executor == "slurm"
    a, b = _by_key(tmp_path / "local" / "results.jsonl"), _by_key(tmp_path / "slurm" / "results.jsonl")
    assert set(a) == set(b) and len(a) >= 2  # dense, random (+ any reference rows the runner adds)
    for k in a:
        for f in ("clean_accuracy", "robust_accuracy", "measured_sparsity"):
            assert a[k][f] == b[k][f], (k, f)
        assert a[k]["min_norm"]["distances"] == b[k]["min_norm"]["distances"], k
        assert b[k]["config"]["executor"] == "slurm"
    # every cell (and the shared base) ran as a submitit job of its own, in another process, and
    # every job left its result (none died)
    jobs = [d for d in (tmp_path / "slurm" / "jobs").iterdir() if d.is_dir() and d.name.isdigit()]
    assert len(jobs) >= len(b) + 1
    assert all(list(d.glob("*_result.pkl")) for d in jobs)
    assert {r["worker"]["pid"] for r in b.values()}.isdisjoint({os.getpid()})
    assert len(list((tmp_path / "slurm" / "base").glob("*.safetensors"))) == 1
    # resume: the same command has nothing left to do and submits no job
    ex = _local_slurm(tmp_path / "slurm" / "jobs2")
    again = run_benchmark(TINY, tmp_path / "slurm", methods=methods, latency=False, executor=ex, **GRID)
    assert again.ran == [] and len(again.skipped) == len(b)
    assert not [d for d in (tmp_path / "slurm" / "jobs2").glob("*") if d.name.isdigit()]


# Builtins pickle by reference, so these run in the job process without the tests on its path.
DIE_ONCE = ("(open({m!r}, 'w').close(), __import__('os').kill(__import__('os').getpid(), 9)) "
            "if not __import__('os').path.exists({m!r}) else 42")


def test_a_job_that_dies_is_resubmitted_and_a_task_that_raises_is_not(tmp_path):
    ex = _local_slurm(tmp_path / "jobs", max_retries=1)
    ex.submit(Task("dies-once", eval, (DIE_ONCE.format(m=str(tmp_path / "marker")),)))
    ex.submit(Task("raises", eval, ("1 / 0",)))
    outs = {}
    while ex.running():
        o = ex.next_done()
        outs[o.task.key] = o
    assert outs["dies-once"].error is None and outs["dies-once"].value == 42
    assert outs["raises"].error.startswith("ZeroDivisionError") and "Traceback" in outs["raises"].traceback
    assert len([d for d in (tmp_path / "jobs").iterdir() if d.name.isdigit()]) == 3  # 2 jobs + 1 resubmission
    # more deaths than max_retries: the outcome names the job and says it ended without a result
    ex = _local_slurm(tmp_path / "jobs2", max_retries=0)
    ex.submit(Task("dies", eval, (DIE_ONCE.format(m=str(tmp_path / "marker2")),)))
    o = ex.next_done()
    assert o.error and "ended without a result 1 time(s)" in o.error


def test_slurm_options_are_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(RuntimeError, match="sbatch"):
        make_executor("slurm", folder=tmp_path / "j")
    with pytest.raises(ValueError, match="gpus_per_cell"):
        _local_slurm(tmp_path, gpus_per_cell=0.5)
    with pytest.raises(ValueError, match="slurm options"):
        make_executor("local", slurm={"partition": "gpu"})
    for argv, needle in ((["--executor", "local", "--slurm-partition", "gpu"], "--slurm-partition"),
                         (["--executor", "slurm", "--slurm-local", "--ray-timeout", "5"], "--ray-timeout"),
                         (["--executor", "slurm", "--slurm-local", "--gpus-per-cell", "0.5"], "--gpus-per-cell")):
        with pytest.raises(SystemExit) as e:
            main(["run", *argv, "--out", str(tmp_path / "o")])
        assert e.value.code == 2 and needle in capsys.readouterr().err
    rc = main(["run", "--executor", "slurm", "--methods", "random", "--out", str(tmp_path / "o"), "-q"])
    assert rc == 1 and "no `sbatch` on PATH" in capsys.readouterr().err
