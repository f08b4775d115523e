"""Dataset loaders: digits split, loader seeding, idx staging, clear missing-data errors, synthetic-cifar10."""
import gzip
import struct

import numpy as np
import pytest
import torch

from apb_sparse.data import DatasetNotFoundError, get_dataset
from apb_sparse.data import datasets as ds_mod


def test_digits_split_is_fixed_stratified_and_in_unit_range():
    a = get_dataset("digits")
    b = get_dataset("digits")
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert a.num_classes == 10 and a.input_shape == (1, 8, 8)
    xa, ya = a.tensors("test")
    xb, yb = b.tensors("test")
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.dtype == torch.float32 and xa.min() >= 0 and xa.max() <= 1 and xa.max() == 1
    counts = torch.bincount(ya, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~20 % of each class
    xt, _ = a.tensors("train")
    assert xt.shape == (1437, 1, 8, 8)


def test_loader_order_depends_only_on_seed():
    d = get_dataset("digits")
    first = lambda seed: next(iter(d.loader("train", batch_size=32, seed=seed)))[1]
    assert torch.equal(first(1), first(1))
    assert not torch.equal(first(1), first(2))
    test_batch = next(iter(d.loader("test", batch_size=16)))[1]
    assert torch.equal(test_batch, d.tensors("test")[1][:16])  # test split is not shuffled
    with pytest.raises(ValueError, match="batch_size"):
        d.loader("train", batch_size=0)
    with pytest.raises(ValueError, match="split"):
        d.loader("val")


def _write_idx(folder, prefix, n, gz):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    files = {f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes(),
             f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 2049, n) + labels.tobytes()}
    for name, payload in files.items():
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as f:
                f.write(payload)
        else:
            (folder / name).write_bytes(payload)
    return imgs, labels


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_a_folder_of_idx_files(tmp_path, monkeypatch, gz):
    monkeypatch.setenv("APB_SPARSE_DATA_DIR", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    imgs, labels = _write_idx(src, "train", 6, gz)
    _write_idx(src, "t10k", 4, gz)
    d = get_dataset("mnist", data_dir=src)
    assert (len(d.train), len(d.test), d.input_shape) == (6, 4, (1, 28, 28))
    x, y = d.tensors("train")
    assert torch.allclose(x[:, 0], torch.from_numpy(imgs).float() / 255)
    assert torch.equal(y, torch.from_numpy(labels).long())
    x0, y0 = d.train[0]
    assert x0.shape == (1, 28, 28) and isinstance(y0, int)


def test_missing_data_errors_say_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("APB_SPARSE_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ds_mod, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        get_dataset("fashion-mnist")
    assert str(tmp_path / "no-debian") in str(e.value)
    with pytest.raises(DatasetNotFoundError, match="download=True") as e:
        get_dataset("mnist", data_dir=tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)
    for name in ("cifar10", "svhn"):
        with pytest.raises(DatasetNotFoundError, match=str(tmp_path)):
            get_dataset(name, data_dir=tmp_path)
    with pytest.raises(ValueError, match="name"):
        get_dataset("imagenet")


@pytest.mark.skipif(not ds_mod.DEBIAN_FASHION_MNIST_DIR.is_dir(),
                    reason="needs `apt-get install dataset-fashion-mnist`")
def test_fashion_mnist_from_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("APB_SPARSE_DATA_DIR", str(tmp_path))
    d = get_dataset("fashion-mnist")
    assert (len(d.train), len(d.test), d.num_classes) == (60000, 10000, 10)
    x, y = d.tensors("test", 500)
    assert x.shape == (500, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert set(y.tolist()) == set(range(10))


def _nearest_mean_accuracy(x, y, xt, yt):
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    pred = torch.cdist(xt.flatten(1), means.flatten(1)).argmin(1)
    return float((pred == yt).float().mean())


def test_synthetic_cifar10_is_cifar_shaped_labelled_and_learnable():
    b = get_dataset("synthetic-cifar10", train_subset=1000)
    assert b.name == "synthetic-cifar10" and b.synthetic and "synthetic" in repr(b)
    assert b.num_classes == 10 and b.input_shape == (3, 32, 32)
    assert (len(b.train), len(b.test)) == (1000, ds_mod.SYNTHETIC_SIZES[1])
    assert ds_mod._ALIASES["synthetic_cifar10"] == "synthetic-cifar10"
    assert "synthetic-cifar10" in ds_mod.available_datasets()
    assert not get_dataset("digits").synthetic
    x, y = b.tensors("train")
    xt, yt = b.tensors("test")
    assert x.shape == (1000, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert torch.bincount(y, minlength=10).min() >= 60  # balanced classes (the full split exactly)
    assert torch.bincount(yt, minlength=10).tolist() == [ds_mod.SYNTHETIC_SIZES[1] // 10] * 10
    assert len(b.mean) == 3 and all(0.3 < m < 0.7 for m in b.mean) and all(0.05 < s < 0.4 for s in b.std)
    # A learnable signal: a nearest-class-mean classifier is far above chance ...
    assert _nearest_mean_accuracy(x, y, xt, yt) > 0.8
    # ... and only because labels carry it (shuffled labels give chance).
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    assert _nearest_mean_accuracy(x, y[perm], xt, yt) < 0.3
    # The loader works as for the real datasets.
    xb, yb = next(iter(b.loader("train", batch_size=16)))
    assert xb.shape == (16, 3, 32, 32) and yb.dtype == torch.long


def test_synthetic_cifar10_is_deterministic_in_its_seed():
    a = ds_mod._synthetic_cifar10(seed=3, sizes=(50, 20))
    b = ds_mod._synthetic_cifar10(seed=3, sizes=(50, 20))
    c = ds_mod._synthetic_cifar10(seed=4, sizes=(50, 20))
    assert torch.equal(a.tensors("train")[0], b.tensors("train")[0])
    assert torch.equal(a.tensors("test")[1], b.tensors("test")[1])
    assert not torch.equal(a.tensors("train")[0], c.tensors("train")[0])
    # train and test are different draws
    assert not torch.equal(a.tensors("train")[0][:20], a.tensors("test")[0])


def test_download_fetches_missing_data_with_torchvision(tmp_path, monkeypatch):
    """download=True (``apb ... --download``) lets torchvision fetch the files; here its download
    step is replaced by one writing small idx files, so no network is used."""
    import torchvision

    monkeypatch.setenv("APB_SPARSE_DATA_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_download(self):
        raw = tmp_path / "data" / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        if not calls:
            _write_idx(raw, "train", 6, gz=False)
            _write_idx(raw, "t10k", 4, gz=False)
        calls.append(self.train)

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fake_download)
    with pytest.raises(DatasetNotFoundError, match="--download"):
        get_dataset("mnist", data_dir=tmp_path / "data")
    assert not calls  # nothing is downloaded unless asked
    d = get_dataset("mnist", data_dir=tmp_path / "data", download=True)
    assert calls and (len(d.train), len(d.test)) == (6, 4)


@pytest.mark.parametrize("name", ["cifar10", "svhn", "mnist"])
def test_failed_download_says_what_to_fetch_and_where(tmp_path, monkeypatch, name):
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets.utils, "urlopen", offline, raising=False)
    for cls in (torchvision.datasets.CIFAR10, torchvision.datasets.SVHN, torchvision.datasets.MNIST):
        monkeypatch.setattr(cls, "download", offline)
    with pytest.raises(DatasetNotFoundError, match="download failed") as e:
        get_dataset(name, data_dir=tmp_path, download=True)
    msg = str(e.value)
    assert str(tmp_path) in msg and "URLError" in msg and "without download" in msg
    assert {"cifar10": "cifar-10-python.tar.gz", "svhn": "train_32x32.mat", "mnist": "idx"}[name] in msg


def test_cli_download_flag_reaches_the_loader(tmp_path, monkeypatch, capsys):
    import urllib.error

    import torchvision

    from apb_sparse.cli import main

    def offline(self):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    rc = main(["run", "--executor", "local", "--datasets", "cifar10", "--archs", "small_cnn", "--methods", "random",
               "--download", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "-q"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "download failed" in err and str(tmp_path / "d") in err
