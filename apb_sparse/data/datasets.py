"""Dataset loaders returning [0, 1] image tensors and integer labels.

Only ``digits`` ships with a dependency (scikit-learn); the others are read with torchvision from a
data directory. Nothing is downloaded unless ``download=True`` (``apb ... --download``); a failed
download says what to fetch by hand and where to put it.  ``synthetic-cifar10`` is generated
(random CIFAR-shaped images with a learnable class signal), for smoke tests of the CIFAR pipeline
on machines without the data; its name says "synthetic" wherever results name their dataset.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = ["DatasetBundle", "DatasetNotFoundError", "get_dataset", "available_datasets",
           "default_data_dir", "DEBIAN_FASHION_MNIST_DIR", "DIGITS_SPLIT_SEED", "SYNTHETIC_SEED",
           "SYNTHETIC_SIZES"]

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
# synthetic-cifar10: generator seed and (train, test) sizes.
SYNTHETIC_SEED = 0
SYNTHETIC_SIZES = (5000, 1000)
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DatasetNotFoundError(FileNotFoundError):
    """The requested dataset is not on disk (and download was not allowed or not possible)."""


def default_data_dir() -> Path:
    """``$APB_SPARSE_DATA_DIR`` if set, else ``~/.cache/apb_sparse/data``."""
    env = os.environ.get("APB_SPARSE_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "apb_sparse" / "data"


@dataclass
class DatasetBundle:
    """A dataset's two splits and what a model needs to know about them.

    Attributes:
        name: canonical dataset name.
        train, test: map-style datasets yielding ``(image, label)``; images are float tensors
            ``input_shape`` in [0, 1], labels ints.
        num_classes: number of classes.
        input_shape: ``(C, H, W)``.
        mean, std: per-channel statistics of the training images, to pass to
            ``get_model(..., mean=bundle.mean, std=bundle.std)``.
        synthetic: True for generated data (``synthetic-cifar10``): results on it say nothing
            about any real dataset.
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: Tuple[int, int, int]
    mean: Tuple[float, ...] = field(default=())
    std: Tuple[float, ...] = field(default=())
    synthetic: bool = False

    def split(self, split: str) -> Dataset:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return self.train if split == "train" else self.test

    def loader(self, split: str = "train", batch_size: int = 128, *, shuffle: Optional[bool] = None,
               seed: int = 0, num_workers: int = 0, drop_last: bool = False,
               n_samples: Optional[int] = None) -> DataLoader:
        """A DataLoader over one split.

        Args:
            split: "train" or "test".
            batch_size: samples per batch (> 0).
            shuffle: default True for "train", False for "test".
            seed: seeds the loader's own generator, so the shuffling order depends only on it.
            num_workers: worker processes (0 = load in the main process).
            drop_last: drop the last incomplete batch.
            n_samples: use only the first ``n_samples`` samples of the split.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        ds = self.split(split)
        if n_samples is not None:
            if n_samples <= 0:
                raise ValueError(f"n_samples must be > 0, got {n_samples}")
            ds = Subset(ds, range(min(n_samples, len(ds))))
        if shuffle is None:
            shuffle = split == "train"
        gen = torch.Generator().manual_seed(int(seed))
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen,
                          num_workers=num_workers, drop_last=drop_last,
                          worker_init_fn=_seed_worker if num_workers > 0 else None)

    def tensors(self, split: str = "test", n_samples: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """The first ``n_samples`` (default all) samples of a split stacked as ``(x, y)`` tensors."""
        ds = self.split(split)
        n = len(ds) if n_samples is None else min(int(n_samples), len(ds))
        if n <= 0:
            raise ValueError(f"n_samples must be > 0, got {n_samples}")
        if isinstance(ds, TensorDataset):
            return ds.tensors[0][:n].clone(), ds.tensors[1][:n].clone()
        if isinstance(ds, _UInt8Images):
            return ds.images[:n].float().div_(255.0), ds.labels[:n].clone()
        xs, ys = zip(*(ds[i] for i in range(n)))
        return torch.stack(xs), torch.as_tensor(ys, dtype=torch.long)

    def __repr__(self) -> str:
        return (f"DatasetBundle(name={self.name!r}, train={len(self.train)}, test={len(self.test)}, "
                f"num_classes={self.num_classes}, input_shape={self.input_shape}"
                f"{', synthetic=True' if self.synthetic else ''})")


def _seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    import random
    random.seed(s)


class _UInt8Images(Dataset):
    """Grayscale uint8 images ``[N, H, W]`` served as float ``[1, H, W]`` in [0, 1].

    Faster than torchvision's PIL round trip per sample, and keeps 1 byte per pixel in memory.
    """

    def __init__(self, images: Tensor, labels: Tensor):
        self.images = images.unsqueeze(1) if images.dim() == 3 else images
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i].float().div_(255.0), int(self.labels[i])


@contextlib.contextmanager
def _download_errors(name: str, folder: Path, what: str):
    """A failed torchvision download (no internet, a proxy, a checksum mismatch) as a
    :class:`DatasetNotFoundError` that says what to fetch by hand and where to put it."""
    try:
        yield
    except DatasetNotFoundError:
        raise
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        raise DatasetNotFoundError(
            f"{name}: the download failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}). Without "
            f"internet here, fetch {what} on a machine with internet, put them in {folder}, then pass the same "
            "data_dir (--data-dir) without download.") from None


# ----------------------------------------------------------------------------- digits
def _digits() -> DatasetBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # pixels are 0..16
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=DIGITS_TEST_FRACTION, stratify=y,
                                              random_state=DIGITS_SPLIT_SEED)
    x_tr, x_te = torch.from_numpy(x_tr), torch.from_numpy(x_te)
    m, s = float(x_tr.mean()), float(x_tr.std())
    return DatasetBundle("digits", TensorDataset(x_tr, torch.from_numpy(y_tr)),
                         TensorDataset(x_te, torch.from_numpy(y_te)), 10, (1, 8, 8), (m,), (s,))


# ----------------------------------------------------------------------------- (fashion-)mnist
def _has_idx(folder: Path) -> bool:
    return all((folder / f).is_file() or (folder / (f + ".gz")).is_file() for f in _IDX_FILES)


def _stage_idx(src: Path, root: Path, cls_name: str) -> Path:
    """Make ``root/<cls_name>/raw`` hold the four uncompressed idx files found in ``src``.

    torchvision reads only uncompressed idx files from its own raw folder; the Debian package (and
    many mirrors) ship .gz files, so they are decompressed once into a cache.
    """
    raw = root / cls_name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for f in _IDX_FILES:
        dst = raw / f
        if dst.is_file():
            continue
        tmp = raw / (f + ".tmp")
        if (src / f).is_file():
            shutil.copyfile(src / f, tmp)
        else:
            with gzip.open(src / (f + ".gz"), "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        os.replace(tmp, dst)  # atomic: a concurrent reader never sees half a file
    return root


def _mnist_like(name: str, data_dir: Optional[Path], download: bool) -> DatasetBundle:
    from torchvision import datasets as tvd

    cls = tvd.FashionMNIST if name == "fashion-mnist" else tvd.MNIST
    cls_name = cls.__name__
    looked: list[str] = []
    roots = [data_dir] if data_dir is not None else [default_data_dir()]
    root: Optional[Path] = None
    for r in roots:
        # torchvision layout <root>/<Class>/raw, or a folder holding the idx files directly.
        looked += [str(r / cls_name / "raw"), str(r)]
        if _has_idx(r / cls_name / "raw") and all((r / cls_name / "raw" / f).is_file() for f in _IDX_FILES):
            root = r
        elif _has_idx(r / cls_name / "raw"):
            root = _stage_idx(r / cls_name / "raw", r, cls_name)
        elif data_dir is not None and _has_idx(r):
            # Only for an explicit folder: MNIST and Fashion-MNIST share file names, so loose idx
            # files in the shared default folder would be ambiguous.
            root = _stage_idx(r, _cache_root(r), cls_name)
        if root is not None:
            break
    if root is None and name == "fashion-mnist" and data_dir is None:
        looked.append(str(DEBIAN_FASHION_MNIST_DIR))
        if _has_idx(DEBIAN_FASHION_MNIST_DIR):
            root = _stage_idx(DEBIAN_FASHION_MNIST_DIR, default_data_dir(), cls_name)
    if root is None and download:
        root = roots[0]
        root.mkdir(parents=True, exist_ok=True)
        with _download_errors(name, root / cls_name / "raw", "the four idx files (.gz is fine)"):
            cls(str(root), train=True, download=True)
            cls(str(root), train=False, download=True)
    if root is None:
        hint = ("install Debian's package (`apt-get install dataset-fashion-mnist`, files go to "
                f"{DEBIAN_FASHION_MNIST_DIR}), " if name == "fashion-mnist" else "")
        raise DatasetNotFoundError(
            f"{name}: the four idx files ({', '.join(_IDX_FILES)}, optionally .gz) were not found; "
            f"looked in {looked}. To get them: {hint}put them in <data_dir>/{cls_name}/raw and pass "
            f"data_dir (--data-dir), or let torchvision download them: `apb ... --download` / "
            f"get_dataset(..., download=True) (needs internet).")
    tr = cls(str(root), train=True, download=False)
    te = cls(str(root), train=False, download=False)
    train = _UInt8Images(tr.data, tr.targets)
    test = _UInt8Images(te.data, te.targets)
    x = train.images.float().div_(255.0)
    return DatasetBundle(name, train, test, 10, (1, 28, 28), (float(x.mean()),), (float(x.std()),))


def _cache_root(src: Path) -> Path:
    # Staging next to read-only sources is not possible; use the cache, keyed by source path.
    key = str(src.resolve()).strip("/").replace("/", "_") or "root"
    return default_data_dir() / "staged" / key


# ----------------------------------------------------------------------------- cifar10 / svhn
def _rgb(name: str, data_dir: Optional[Path], download: bool, augment: bool) -> DatasetBundle:
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    root = data_dir if data_dir is not None else default_data_dir()
    to_tensor = T.ToTensor()
    if download:
        root.mkdir(parents=True, exist_ok=True)
        what = ("cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/ (unpacked: cifar-10-batches-py/)"
                if name == "cifar10" else "train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/")
        with _download_errors(name, root, what):
            if name == "cifar10":
                tvd.CIFAR10(str(root), train=True, download=True)
                tvd.CIFAR10(str(root), train=False, download=True)
            else:
                tvd.SVHN(str(root), split="train", download=True)
                tvd.SVHN(str(root), split="test", download=True)
    try:
        if name == "cifar10":
            aug = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), to_tensor]) if augment else to_tensor
            train = tvd.CIFAR10(str(root), train=True, transform=aug, download=download)
            test = tvd.CIFAR10(str(root), train=False, transform=to_tensor, download=download)
            mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
        else:
            # No flips for digits: a mirrored 2 is not a 2.
            aug = T.Compose([T.RandomCrop(32, padding=4), to_tensor]) if augment else to_tensor
            train = tvd.SVHN(str(root), split="train", transform=aug, download=download)
            test = tvd.SVHN(str(root), split="test", transform=to_tensor, download=download)
            mean, std = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
    except RuntimeError as e:
        if download:
            raise
        where = root / "cifar-10-batches-py" if name == "cifar10" else root / "train_32x32.mat"
        raise DatasetNotFoundError(
            f"{name}: not found under {root} (expected {where}). Pass data_dir (--data-dir) pointing at a "
            f"folder that holds it, or let torchvision download it: `apb ... --download` / "
            f"get_dataset(..., download=True) (needs internet). torchvision said: {e}") from None
    return DatasetBundle(name, train, test, 10, (3, 32, 32), mean, std)


# ----------------------------------------------------------------------------- synthetic-cifar10
def _synthetic_cifar10(seed: int = SYNTHETIC_SEED, sizes: Tuple[int, int] = SYNTHETIC_SIZES) -> DatasetBundle:
    """CIFAR-10-shaped random data (3 x 32 x 32 in [0, 1], 10 balanced classes) with a learnable
    signal: each class has a smooth random colour pattern (a 3 x 4 x 4 grid upsampled bilinearly),
    and an image is its class pattern at a random contrast plus Gaussian pixel noise.  Two class
    patterns differ by about 0.05 per pixel on average, a few times eps = 8/255, so the class is
    learnable under Linf attacks too, while a perturbation of size eps still moves images a good
    part of the way to another class (robust accuracy is not trivially 100 %).  Deterministic in ``seed``; train and test are drawn
    from the same distribution with disjoint random streams.

    Meant only to exercise the CIFAR code paths (shapes, models, kernels, the pipeline) where
    CIFAR-10 is not on disk: nothing measured on it transfers to CIFAR-10.
    """
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(int(seed))
    protos = F.interpolate(torch.rand(10, 3, 4, 4, generator=gen) - 0.5, size=(32, 32), mode="bilinear",
                           align_corners=False)
    protos = protos / protos.flatten(1).abs().amax(1).view(10, 1, 1, 1)  # each pattern spans [-1, 1]

    def draw(n: int) -> Tuple[Tensor, Tensor]:
        y = torch.arange(n) % 10
        y = y[torch.randperm(n, generator=gen)]
        contrast = 0.05 + 0.1 * torch.rand(n, 1, 1, 1, generator=gen)
        x = 0.5 + contrast * protos[y] + 0.15 * torch.randn(n, 3, 32, 32, generator=gen)
        return x.clamp_(0.0, 1.0), y

    x_tr, y_tr = draw(int(sizes[0]))
    x_te, y_te = draw(int(sizes[1]))
    mean = tuple(float(m) for m in x_tr.mean((0, 2, 3)))
    std = tuple(float(s) for s in x_tr.std((0, 2, 3)))
    return DatasetBundle("synthetic-cifar10", TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te), 10,
                         (3, 32, 32), mean, std, synthetic=True)


# ----------------------------------------------------------------------------- registry
_ALIASES = {"digits": "digits", "fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist",
            "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "mnist": "mnist",
            "cifar10": "cifar10", "cifar-10": "cifar10", "svhn": "svhn",
            "synthetic-cifar10": "synthetic-cifar10", "synthetic_cifar10": "synthetic-cifar10"}


def available_datasets() -> list[str]:
    """Canonical names accepted by :func:`get_dataset`."""
    return ["digits", "fashion-mnist", "mnist", "cifar10", "svhn", "synthetic-cifar10"]


def get_dataset(name: str, data_dir: Union[str, os.PathLike, None] = None, download: bool = False,
                *, augment: bool = True, train_subset: Optional[int] = None) -> DatasetBundle:
    """Load a dataset's train and test splits.

    Args:
        name: "digits" (sklearn 8x8, fixed stratified 80/20 split, seed ``DIGITS_SPLIT_SEED``),
            "fashion-mnist", "mnist", "cifar10", "svhn", or "synthetic-cifar10" (generated
            CIFAR-shaped data with a learnable signal, ``SYNTHETIC_SIZES`` train / test images,
            seed ``SYNTHETIC_SEED``: for smoke tests without CIFAR-10, never for results).
        data_dir: folder holding the data (torchvision layout, or the four idx files directly for
            the MNIST family). Default: ``default_data_dir()``; for fashion-mnist also Debian's
            ``/usr/share/datasets/fashion-mnist``.
        download: let torchvision download missing data (never done otherwise).
        augment: random crops (and flips for cifar10) on the training split of cifar10 / svhn.
        train_subset: keep only the first ``train_subset`` training samples (quick runs).

    Returns:
        A :class:`DatasetBundle`.

    Raises:
        ValueError: unknown ``name`` or bad ``train_subset``.
        DatasetNotFoundError: the data is not on disk and ``download`` is False; the message says
            where it looked and how to get it.
    """
    if not isinstance(name, str) or name.lower() not in _ALIASES:
        raise ValueError(f"unknown dataset name {name!r}; expected one of {available_datasets()}")
    key = _ALIASES[name.lower()]
    ddir = Path(data_dir).expanduser() if data_dir is not None else None
    if key == "digits":
        bundle = _digits()
    elif key == "synthetic-cifar10":
        bundle = _synthetic_cifar10()
    elif key in ("fashion-mnist", "mnist"):
        bundle = _mnist_like(key, ddir, download)
    else:
        bundle = _rgb(key, ddir, download, augment)
    if train_subset is not None:
        if train_subset <= 0:
            raise ValueError(f"train_subset must be > 0, got {train_subset}")
        tr = bundle.train
        if isinstance(tr, _UInt8Images):
            bundle.train = _UInt8Images(tr.images[:train_subset], tr.labels[:train_subset])
        elif isinstance(tr, TensorDataset):
            bundle.train = TensorDataset(*(t[:train_subset] for t in tr.tensors))
        else:
            bundle.train = Subset(tr, range(min(train_subset, len(tr))))
    return bundle
