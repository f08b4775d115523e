"""The ``apb`` command line: argument errors name the argument; ``apb eval --checkpoint`` on a
dense-with-zeros state dict saved by plain torch; taxonomy and leaderboard subcommands."""
from __future__ import annotations

import json

import pytest
import torch

import apb_sparse
from apb_sparse.bench.results import ResultsStore
from apb_sparse.cli import main
from apb_sparse.models import get_model


def _error(capsys, argv):
    """stderr of a command that must fail with exit code 2 (argparse's SystemExit or main's return)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["run", "--sparsities", "90"], "--sparsities"),
    (["run", "--sparsities", "abc"], "--sparsities"),
    (["run", "--methods", "hydra", "no_such_method"], "--methods"),
    (["run", "--preset", "huge"], "--preset"),
    (["run", "--structures", "diagonal"], "--structures"),
    (["run", "--datasets", "imagenet"], "--datasets"),
    (["run", "--base-epochs", "0"], "--base-epochs"),
    (["prune", "--method", "hydra", "--sparsity", "0.9", "--structure", "filter"], "--structure"),
    (["prune", "--method", "hydra"], "--sparsity"),
    (["eval", "--checkpoint", "/no/such/file.pt"], "--checkpoint"),
    (["eval", "--checkpoint", "x.pt", "--eps", "-1"], "--eps"),
    (["bench", "latency", "--batch", "0"], "--batch"),
])
def test_bad_arguments_exit_2_naming_the_argument(capsys, argv, needle):
    err = _error(capsys, argv)
    assert needle in err


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    """A tiny small_cnn, magnitude-pruned to 80 %, saved as a plain dense state dict with torch.save."""
    torch.manual_seed(0)
    model = get_model("small_cnn", num_classes=10, in_channels=1, width=4)
    pruned = apb_sparse.apply_masks(model, apb_sparse.magnitude_masks(model, 0.8))
    path = tmp_path_factory.mktemp("ckpt") / "pruned.pt"
    torch.save(pruned.state_dict(), path)
    return path, pruned


EVAL_FAST = ["--dataset", "digits", "--n-samples", "16", "--fmn-samples", "8", "--check-samples", "8",
             "--fmn-steps", "5"]


def test_eval_plain_dense_with_zeros_checkpoint(plain_checkpoint, tmp_path, capsys):
    path, pruned = plain_checkpoint
    out = tmp_path / "eval.json"
    sparse_out = tmp_path / "sparse.safetensors"
    rc = main(["eval", "--checkpoint", str(path), "--arch", "small_cnn", "--model-kwargs", '{"width": 4}',
               *EVAL_FAST, "--out", str(out), "--save-sparse", str(sparse_out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "detected sparsity 80.00 %" in text
    doc = json.loads(out.read_text())
    assert doc["kind"] == "dense state dict"
    assert doc["measured_sparsity"] == pytest.approx(0.8, abs=0.005)
    # what the command evaluated is the checkpoint's function: compare clean accuracy with our own
    from apb_sparse.data import get_dataset
    x, y = get_dataset("digits").tensors("test", 16)
    with torch.no_grad():
        acc = float((pruned.eval()(x).argmax(1) == y).float().mean())
    assert doc["clean_accuracy"] == pytest.approx(acc)
    assert 0 <= doc["robust_accuracy"] <= doc["clean_accuracy"]
    assert doc["sparse_check"]["prediction_agreement"] == 1.0
    assert doc["latency"]["cpu"]["outputs_match"]
    assert len(doc["min_norm"]["checks"]) == 4
    # the sparse copy is an apb_sparse checkpoint that `apb eval` reads back
    rc = main(["eval", "--checkpoint", str(sparse_out), *EVAL_FAST, "--no-latency"])
    assert rc == 0
    assert "apb_sparse checkpoint" in capsys.readouterr().out


def test_eval_plain_checkpoint_errors(plain_checkpoint, tmp_path, capsys):
    path, pruned = plain_checkpoint
    err = _error(capsys, ["eval", "--checkpoint", str(path), "--dataset", "digits"])
    assert "--arch" in err
    sd = pruned.state_dict()
    del sd["classifier.bias"]
    bad = tmp_path / "missing.pt"
    torch.save(sd, bad)
    rc = main(["eval", "--checkpoint", str(bad), "--arch", "small_cnn", "--model-kwargs", '{"width": 4}', *EVAL_FAST])
    assert rc == 2
    assert "classifier.bias" in capsys.readouterr().err


def test_taxonomy_lists_surveyed_and_registry_methods(capsys):
    assert main(["taxonomy"]) == 0
    out = capsys.readouterr().out
    for name in ("HYDRA", "RADMM", "FlyingBird", "lwm_local"):
        assert name in out


def test_leaderboard_command(tmp_path, capsys):
    store = ResultsStore(tmp_path / "results.jsonl")
    store.append({"method": "hydra", "arch": "small_cnn", "dataset": "digits", "structure": "unstructured",
                  "sparsity": 0.9, "seed": 0, "clean_accuracy": 0.9, "robust_accuracy": 0.5})
    assert main(["leaderboard", "--out", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "| hydra |" in out and (tmp_path / "leaderboard.csv").is_file()
    err = _error(capsys, ["leaderboard", "--out", str(tmp_path / "nothing")])
    assert "--out" in err


def test_eval_checkpoint_from_another_tool_without_normalisation_buffers(tmp_path, capsys):
    """A state dict saved by other tooling (DataParallel "module." prefix, normalisation done
    outside the model, so no normalize.* buffers) loads with the dataset's statistics, and the
    evaluated function is the original one; without --normalize it would be refused as strict."""
    from apb_sparse.bench.checkpoint import load_dense_model
    from apb_sparse.data import get_dataset

    torch.manual_seed(1)
    data = get_dataset("digits")
    model = get_model("small_cnn", num_classes=10, in_channels=1, width=4, mean=data.mean, std=data.std)
    pruned = apb_sparse.apply_masks(model, apb_sparse.magnitude_masks(model, 0.8)).eval()
    foreign = {"module." + k: v for k, v in pruned.state_dict().items() if not k.startswith("normalize.")}
    path = tmp_path / "foreign.pt"
    torch.save(foreign, path)
    out = tmp_path / "eval.json"
    rc = main(["eval", "--checkpoint", str(path), "--arch", "small_cnn", "--model-kwargs", '{"width": 4}',
               *EVAL_FAST, "--no-latency", "--out", str(out)])
    assert rc == 0
    assert "normalised with the digits statistics" in capsys.readouterr().out
    x, y = data.tensors("test", 16)
    with torch.no_grad():
        acc = float((pruned(x).argmax(1) == y).float().mean())
    assert json.loads(out.read_text())["clean_accuracy"] == pytest.approx(acc)
    # "none": identity normalisation, i.e. the same weights fed raw [0, 1] inputs
    raw = load_dense_model(path, "small_cnn", model_kwargs={"width": 4}, normalization=([0.0], [1.0]))
    assert raw.apb_normalization == "supplied"
    assert torch.equal(raw.normalize.mean.flatten(), torch.zeros(1))
    with pytest.raises(ValueError, match="normalize.mean"):
        load_dense_model(path, "small_cnn", model_kwargs={"width": 4})


# ------------------------------------------------------------------ bad files: one line, no traceback


def _one_line_error(capsys, argv, code=2):
    """The command fails with ``code`` and exactly one stderr line ``apb: error: ...``."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("apb: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def apb_checkpoint(tmp_path_factory):
    """A small_cnn sparsified to 80 % and saved with save_checkpoint (records its dataset)."""
    from apb_sparse.bench.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = get_model("small_cnn", num_classes=10, in_channels=1, width=4)
    sparse = apb_sparse.sparsify(apb_sparse.apply_masks(model, apb_sparse.magnitude_masks(model, 0.8)),
                                 layout="unstructured")
    path = tmp_path_factory.mktemp("apb") / "good.safetensors"
    save_checkpoint(sparse, path, arch="small_cnn", num_classes=10, in_channels=1, model_kwargs={"width": 4},
                    extra={"dataset": "digits"})
    return path


def _tampered(good, tmp_path, kind):
    """A broken copy of ``good``: the ways a file from the internet or a full disk goes wrong."""
    import os

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    data = good.read_bytes()
    out = tmp_path / f"{kind}.safetensors"
    if kind == "truncated":
        out.write_bytes(data[: len(data) // 2])
        return out
    if kind == "random":
        out.write_bytes(os.urandom(2000))
        return out
    if kind == "huge_header":
        out.write_bytes((10 ** 15).to_bytes(8, "little") + b"{}")
        return out
    if kind == "random_pt":
        out = out.with_suffix(".pt")
        out.write_bytes(os.urandom(2000))
        return out
    with safe_open(str(good), "pt") as f:
        config = json.loads(f.metadata()["apb_sparse_config"])
    state = load_file(str(good))
    if kind == "no_arch":
        del config["arch"]
    elif kind == "bad_json":
        config = "{not json"
    elif kind == "bad_num_classes":
        config["num_classes"] = -3
    elif kind == "unknown_arch":
        config["arch"] = "no_such_net"
    elif kind == "col_idx":
        key = next(k for k in state if k.endswith("col_idx"))
        state[key] = state[key] + 10_000
    elif kind == "row_ptr":
        key = next(k for k in state if k.endswith("row_ptr"))
        state[key] = state[key].flip(0).contiguous()
    elif kind == "values_length":
        key = next(k for k in state if k.endswith("values"))
        state[key] = torch.cat([state[key], state[key]])
    blob = config if isinstance(config, str) else json.dumps(config)
    save_file(state, str(out), metadata={"apb_sparse_config": blob})
    return out


BROKEN = ["truncated", "random", "huge_header", "random_pt", "no_arch", "bad_json", "bad_num_classes",
          "unknown_arch", "col_idx", "row_ptr", "values_length"]


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_checkpoints_give_one_error_line_naming_the_file(apb_checkpoint, tmp_path, capsys, kind):
    bad = _tampered(apb_checkpoint, tmp_path, kind)
    for argv in (["eval", "--checkpoint", str(bad), *EVAL_FAST],
                 ["bench", "latency", "--checkpoint", str(bad), "--batch", "1", "--rounds", "1"]):
        if kind == "random_pt" and argv[0] == "bench":
            continue  # bench latency reads apb_sparse checkpoints only (covered by the other kinds)
        line = _one_line_error(capsys, argv)
        assert bad.name in line and "--checkpoint" in line
        assert "--arch and --dataset are required" not in line  # the file is broken, not the arguments


def test_good_checkpoint_still_loads(apb_checkpoint, capsys):
    assert main(["bench", "latency", "--checkpoint", str(apb_checkpoint), "--batch", "1", "--rounds", "1"]) == 0
    assert "speedup" in capsys.readouterr().out


def test_bench_latency_tune_deploys_with_measured_layouts(apb_checkpoint, tmp_path, capsys):
    out = tmp_path / "lat.json"
    assert main(["bench", "latency", "--checkpoint", str(apb_checkpoint), "--batch", "2", "--rounds", "1", "--tune",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert rows and all(r["tuned_layers"] >= 1 and r["outputs_match"] for r in rows)
    assert main(["bench", "latency", "--checkpoint", str(apb_checkpoint), "--batch", "2", "--rounds", "1",
                 "--out", str(out)]) == 0
    assert all(r["tuned_layers"] == 0 for r in json.loads(out.read_text())["results"])


def test_unwritable_outputs_are_refused_before_any_work(apb_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cases = [
        (["eval", "--checkpoint", str(apb_checkpoint), *EVAL_FAST, "--out", str(blocker / "r.json")], "--out"),
        (["eval", "--checkpoint", str(apb_checkpoint), *EVAL_FAST, "--save-sparse", str(blocker / "s.safetensors")],
         "--save-sparse"),
        (["eval", "--checkpoint", str(apb_checkpoint), *EVAL_FAST, "--save-sparse", str(tmp_path / "s.pt")],
         "--save-sparse"),
        (["eval", "--checkpoint", str(apb_checkpoint), *EVAL_FAST, "--out", str(tmp_path)], "--out"),
        (["bench", "latency", "--checkpoint", str(apb_checkpoint), "--out", str(blocker / "l.json")], "--out"),
        (["prune", "--method", "lwm_local", "--sparsity", "0.5", "--out", str(blocker / "p.safetensors")], "--out"),
    ]
    for argv, flag in cases:
        line = _one_line_error(capsys, argv)
        assert flag in line
    out = capsys.readouterr().out
    assert "clean" not in out and "speedup" not in out  # failed before evaluating or timing


def test_prune_with_broken_base_fails_before_training(apb_checkpoint, tmp_path, capsys):
    bad = _tampered(apb_checkpoint, tmp_path, "truncated")
    line = _one_line_error(capsys, ["prune", "--method", "lwm_local", "--sparsity", "0.5", "--base", str(bad),
                                    "--out", str(tmp_path / "p.safetensors")])
    assert "--base" in line and bad.name in line


def test_unexpected_failures_are_one_line_with_exit_1(monkeypatch, capsys):
    import apb_sparse.cli as cli

    def boom(args, parser):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(cli, "_cmd_taxonomy", boom)
    line = _one_line_error(capsys, ["taxonomy"], code=1)
    assert "RuntimeError: something broke" in line and "APB_DEBUG" in line
    monkeypatch.setenv("APB_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["taxonomy"])


def test_run_repeated_grid_values_are_reported_and_local_executor_takes_no_workers(capsys):
    err = _error(capsys, ["run", "--sparsities", "0.5", "0.5", "--seeds", "0", "0", "--executor", "local",
                          "--workers", "2"])
    assert "--sparsities repeats [0.5]" in err and "--seeds repeats [0]" in err
    assert "--workers" in err and "--executor ray" in err
    err = _error(capsys, ["run", "--executor", "local", "--gpus-per-cell", "1"])
    assert "--gpus-per-cell" in err
    err = _error(capsys, ["run", "--cpus-per-cell", "0"])
    assert "--cpus-per-cell" in err


# ------------------------------------------------------------------ issue 24: sizes, NaN, run folders, summary
def test_absurd_model_sizes_and_nan_weights_are_one_line_errors(apb_checkpoint, plain_checkpoint, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(apb_checkpoint), "pt") as f:
        config = json.loads(f.metadata()["apb_sparse_config"])
    state = load_file(str(apb_checkpoint))
    huge = tmp_path / "huge.safetensors"
    save_file(state, str(huge), metadata={"apb_sparse_config": json.dumps(dict(config, model_kwargs={"width": 10 ** 8}))})
    line = _one_line_error(capsys, ["eval", "--checkpoint", str(huge), *EVAL_FAST])
    assert "--checkpoint" in line and '"width": 100000000' in line and "GiB" in line  # not an allocator error

    path, _ = plain_checkpoint
    line = _one_line_error(capsys, ["eval", "--checkpoint", str(path), "--arch", "small_cnn", "--model-kwargs",
                                    '{"width": 100000000}', *EVAL_FAST])
    assert "--model-kwargs" in line and "GiB" in line

    sd = torch.load(path, weights_only=True)
    sd = {k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v) for k, v in sd.items()}
    nan = tmp_path / "nan.pt"
    torch.save(sd, nan)
    line = _one_line_error(capsys, ["eval", "--checkpoint", str(nan), "--arch", "small_cnn", "--model-kwargs",
                                    '{"width": 4}', *EVAL_FAST])
    assert "--checkpoint" in line and "all NaN" in line and "nan.pt" in line
    key = next(k for k in state if k.endswith("values"))
    nan_values = tmp_path / "nan_values.safetensors"
    save_file(dict(state, **{key: torch.full_like(state[key], float("nan"))}), str(nan_values),
              metadata={"apb_sparse_config": json.dumps(config)})
    line = _one_line_error(capsys, ["eval", "--checkpoint", str(nan_values), *EVAL_FAST])
    assert "--checkpoint" in line and key in line and "NaN" in line
    line = _one_line_error(capsys, ["bench", "latency", "--checkpoint", str(nan_values), "--batch", "1", "--rounds", "1"])
    assert "--checkpoint" in line and "NaN" in line and "differs from dense" not in line


def test_run_out_must_be_a_writable_folder(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    base = ["run", "--methods", "random", "--sparsities", "0.9", "--executor", "local", "-q"]
    line = _one_line_error(capsys, base + ["--out", str(blocker)])
    assert "--out" in line and "is a file" in line
    line = _one_line_error(capsys, base + ["--out", str(blocker / "sub")])
    assert "--out" in line and "not a directory" in line
    assert not list(tmp_path.glob("**/results.jsonl"))  # refused before any work


def test_run_summary_has_a_seed_column_and_full_structure_names(tmp_path, capsys):
    from apb_sparse.bench.runner import RunSummary
    from apb_sparse.cli import _print_summary

    store = ResultsStore(tmp_path / "results.jsonl")
    for seed in (0, 1):
        for method, structure, sparsity in (("dense", "none", 0.0), ("dense_base", "none", 0.0),
                                            ("hydra", "unstructured", 0.9), ("radmm", "filter", 0.5)):
            store.append({"method": method, "arch": "small_cnn", "dataset": "digits", "structure": structure,
                          "sparsity": sparsity, "seed": seed, "clean_accuracy": 0.9, "robust_accuracy": 0.5})
    _print_summary(RunSummary(tmp_path), 1.0)
    lines = capsys.readouterr().out.splitlines()
    header = next(l for l in lines if l.startswith("method"))
    assert "structure" in header and "seed" in header.split()
    rows = [l.split() for l in lines if l.split() and l.split()[0] in ("dense", "dense_base", "hydra", "radmm")]
    assert sorted((r[0], r[2]) for r in rows if r[0] == "dense") == [("dense", "0"), ("dense", "1")]  # once per seed
    assert {r[1] for r in rows if r[0] == "hydra"} == {"unstructured"}  # not cut to "unstru"
    assert {r[1] for r in rows if r[0] == "radmm"} == {"filter"}


def test_eval_shows_progress_and_names_its_speedup_baseline(apb_checkpoint, capsys):
    from apb_sparse.bench.runner import LATENCY_BASELINE

    assert main(["eval", "--checkpoint", str(apb_checkpoint), *EVAL_FAST]) == 0
    captured = capsys.readouterr()
    for phase in ("sparsify and check", "AutoAttack", "FMN min-norm", "latency"):
        assert phase in captured.err  # the tqdm bar names every phase as it starts
    assert f"speedup baseline (the leaderboard's): {LATENCY_BASELINE}" in captured.out
