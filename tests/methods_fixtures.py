"""Shared recipes, data and models of the tests/test_methods_<module>.py files (see docs/methods.md).

Tiny models (small_cnn width 4 or 8) on sklearn digits (a 256-image subset for RECIPE / ZERO, the
whole set for QUICK), one or two PGD steps, a few epochs: each file runs in well under a minute on
one core. The data and the pretrained model are cached (functools.lru_cache), so files run in one
session share them.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.data import TensorDataset

from apb_sparse import methods
from apb_sparse.data import get_dataset
from apb_sparse.data.datasets import DatasetBundle
from apb_sparse.models import get_model
from apb_sparse.nn import masked_layers

# ------------------------------------------------------- 256 digits (HARP, FlyingBird, RobustBird, Li20, TwinRep)
RECIPE = methods.Recipe(arch="small_cnn", dataset="digits", eps=0.1, steps=1, pretrain_epochs=1,
                        prune_epochs=1, finetune_epochs=1, batch_size=32, lr=0.05,
                        finetune_lr=0.02, seed=0)
ZERO = RECIPE.replace(pretrain_epochs=0, prune_epochs=0, finetune_epochs=0)
STEPS_PER_EPOCH = 8  # 256 images / 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: thread start-up and contention on a shared CPU cost more than they save.
    # Autouse in every test file that imports it by name.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@functools.lru_cache(maxsize=None)
def _digits_256() -> DatasetBundle:
    full = get_dataset("digits")
    x, y = full.tensors("train")
    xt, yt = full.tensors("test")
    return DatasetBundle("digits-256", TensorDataset(x[:256], y[:256]), TensorDataset(xt[:64], yt[:64]),
                         10, (1, 8, 8), full.mean, full.std)


def _model(width: int = 4, seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        d = _digits_256()
        return get_model("small_cnn", num_classes=10, in_channels=1, width=width, mean=d.mean, std=d.std)


@functools.lru_cache(maxsize=None)
def _pretrained() -> torch.nn.Module:
    from apb_sparse.train import train

    m = _model()
    train(m, _digits_256(), RECIPE.train_config(4), progress=False)
    return m


def _layer_density(model) -> list:
    return [1.0 - l.sparsity for _, l in masked_layers(model)]


# ------------------------------------------------------- all digits (PwoA, MAD, HYDRA, RADMM, RST)
# The quick preset's recipe shape: digits at batch 128 (12 steps per epoch), prune_epochs=1.
QUICK = methods.Recipe(arch="small_cnn", dataset="digits", eps=0.1, steps=2, pretrain_epochs=0,
                       prune_epochs=1, finetune_epochs=0, batch_size=128, lr=0.05,
                       finetune_lr=0.02, seed=0)


@functools.lru_cache(maxsize=None)
def _digits():
    return get_dataset("digits")


def _fresh_model(width=None):
    if width is None:
        return QUICK.build_model(_digits())
    torch.manual_seed(0)
    return get_model("small_cnn", num_classes=10, in_channels=1, width=width)
