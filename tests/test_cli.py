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
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
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
