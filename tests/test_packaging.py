"""Packaging: core dependencies, one version, and a clear error when the `bench` extra is missing."""
import importlib.metadata
import tomllib
from pathlib import Path

import apb_sparse
from apb_sparse import cli

ROOT = Path(__file__).resolve().parents[1]


def test_core_dependencies_are_torch_and_numpy_and_extras_exist():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(d.split(">")[0].split("<")[0].split("=")[0] for d in meta["dependencies"]) == ["numpy", "torch"]
    assert {"bench", "ray", "slurm", "onnx", "test"} <= set(meta["optional-dependencies"])


def test_version_is_defined_once():
    assert "version" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dynamic"]
    assert importlib.metadata.version("apb_sparse") == apb_sparse.__version__


def test_missing_bench_extra_is_one_clear_error(monkeypatch, capsys):
    def missing(parser, args):
        raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")

    monkeypatch.setattr(cli, "_dispatch", missing)
    assert cli.main(["taxonomy"]) == 1
    err = capsys.readouterr().err
    assert "apb: error:" in err and "apb_sparse[bench]" in err and "sklearn" in err
