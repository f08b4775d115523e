"""The training recipe every pruning method shares (:class:`Recipe`).

**Epoch budget.** All methods share one :class:`Recipe`. Its three phase lengths add up to the
budget every method spends:

* pipeline A (prune after training): ``pretrain_epochs`` dense training (skipped when the caller
  says the model is ``pretrained``), ``prune_epochs`` for the pruning phase (score learning, ADMM,
  ...), ``finetune_epochs`` masked finetuning. One-shot criteria that need no training to prune
  (magnitude, random, MAD) spend ``prune_epochs`` finetuning as well.
* pipeline B (prune before training): ``prune_epochs`` of ticket search, then
  ``pretrain_epochs + finetune_epochs`` of training the sparse network (RST: all epochs on scores).
* pipeline D (prune during training): one run of all ``pretrain + prune + finetune`` epochs.

**Recipe and TrainConfig.** A recipe carries every field of ``train.TrainConfig`` but ``epochs``
(one recipe drives several phases of different lengths); :meth:`Recipe.train_config` copies them
into the ``TrainConfig`` of one phase, and their defaults are TrainConfig's own. They are flat
fields rather than a nested ``TrainConfig`` so that ``Recipe(eps=..., lr=...)``, ``recipe.eps``,
``recipe.replace(eps=...)``, ``dataclasses.replace`` and ``asdict(recipe)`` stay as they were.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..data import get_dataset
from ..models import get_model
from ..train import TrainConfig

__all__ = ["Recipe"]


@dataclass
class Recipe:
    """The training recipe every method shares; per-method hyper-parameters sit on the method.

    Attributes:
        arch: architecture name for ``apb_sparse.models.get_model`` (used when no model is given).
        dataset: dataset name for ``apb_sparse.data.get_dataset`` (used when no data is given).
        mode: adversarial-training loss of every AT phase: "pgd", "trades", "fgsm" or "natural".
        norm, eps, alpha, steps: the training attack (``alpha=None``: train.py's default step).
        pretrain_epochs, prune_epochs, finetune_epochs: the phase lengths (see module docstring).
        batch_size: minibatch size.
        lr: learning rate of training from scratch / dense pretraining and of score learning.
        finetune_lr: learning rate of masked finetuning (the papers finetune at ~1/10 of ``lr``).
        weight_decay, momentum, optimizer, scheduler: as in ``train.TrainConfig``.
        trades_beta: TRADES trade-off when ``mode == "trades"``.
        seed: seeds model construction, masks, data order and attacks.
        progress: show train.py's progress bars.
    """

    # The fields shared with train.TrainConfig take its defaults (one place to change them).
    arch: str = "resnet18"
    dataset: str = "cifar10"
    mode: str = TrainConfig.mode
    norm: str = TrainConfig.norm
    eps: float = TrainConfig.eps
    alpha: Optional[float] = TrainConfig.alpha
    steps: int = TrainConfig.steps
    pretrain_epochs: int = 100
    prune_epochs: int = 20
    finetune_epochs: int = 50
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    finetune_lr: float = 0.01
    weight_decay: float = TrainConfig.weight_decay
    momentum: float = TrainConfig.momentum
    optimizer: str = TrainConfig.optimizer
    scheduler: str = TrainConfig.scheduler
    trades_beta: float = TrainConfig.trades_beta
    seed: int = TrainConfig.seed
    progress: bool = False

    def __post_init__(self):
        for name in ("pretrain_epochs", "prune_epochs", "finetune_epochs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"Recipe.{name} must be an int >= 0, got {v!r}")
        if self.mode not in ("natural", "pgd", "trades", "fgsm"):
            raise ValueError(f"Recipe.mode must be 'natural', 'pgd', 'trades' or 'fgsm', got {self.mode!r}")
        if self.norm not in ("Linf", "L2"):
            raise ValueError(f"Recipe.norm must be 'Linf' or 'L2', got {self.norm!r}")
        if self.eps < 0:
            raise ValueError(f"Recipe.eps must be >= 0, got {self.eps}")

    @property
    def total_epochs(self) -> int:
        return self.pretrain_epochs + self.prune_epochs + self.finetune_epochs

    def replace(self, **changes) -> "Recipe":
        """A copy with some fields changed."""
        return replace(self, **changes)

    def train_config(self, epochs: int, *, mode: Optional[str] = None, lr: Optional[float] = None,
                     **overrides) -> TrainConfig:
        """The ``train.TrainConfig`` of one phase of this recipe."""
        kw: Dict[str, Any] = {name: getattr(self, name) for name in _TRAIN_CONFIG_FIELDS}
        kw.update(mode=self.mode if mode is None else mode, epochs=int(epochs),
                  lr=self.lr if lr is None else lr)
        kw.update(overrides)
        return TrainConfig(**kw)

    def build_model(self, data=None) -> nn.Module:
        """A freshly initialised ``arch`` (seeded by ``seed``) sized for ``data``."""
        kw: Dict[str, Any] = {}
        num_classes, in_channels = 10, 3
        if data is not None:
            num_classes = int(data.num_classes)
            in_channels = int(data.input_shape[0])
            if getattr(data, "mean", ()):
                kw.update(mean=data.mean, std=data.std)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return get_model(self.arch, num_classes=num_classes, in_channels=in_channels, **kw)

    def load_data(self):
        return get_dataset(self.dataset)


#: The ``TrainConfig`` fields a recipe carries (all but ``epochs``, which each phase sets).
_TRAIN_CONFIG_FIELDS = tuple(f.name for f in fields(TrainConfig) if f.name != "epochs")
