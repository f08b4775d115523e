"""The one training loop of the package: natural, PGD-AT, TRADES and fast FGSM adversarial training.

Every pruning method trains through :func:`train`; it customises the loop with ``params`` (what
is optimised, e.g. only score tensors), ``loss_fn`` / ``extra_loss`` and the ``on_step`` /
``on_epoch_end`` hooks, never with a loop of its own.

Batch norm during attacks: adversarial examples are generated with the model in **eval** mode
(BN uses its running statistics and is not updated by attack iterations; dropout is off), then the
model goes back to train mode for the loss. This is what TRADES' reference code does; it keeps
the attack's BN statistics from drifting towards adversarial batches and makes the attack a
deterministic function of the weights. The mode is restored exactly (a model in eval mode stays
in eval mode).

Masks: after every optimiser step :func:`train` calls ``apply_mask_()`` on every
``MaskedConv2d`` / ``MaskedLinear``, so pruned weights stay exactly zero (momentum and weight decay
cannot revive them).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn import masked_layers
from .pgd import NORMS, _lp_norm, _project, pgd
from .pgd import _model_device as _device_of

__all__ = ["TrainConfig", "TrainLog", "train", "mode_loss", "accuracy", "adversarial_examples",
           "MODES"]

MODES = ("natural", "pgd", "trades", "fgsm")
_OPTIMIZERS = ("sgd", "adam")
_SCHEDULERS = ("cosine", "constant", "step")

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    Attributes:
        mode: "natural", "pgd" (Madry PGD-AT), "trades" (Zhang et al. 2019) or "fgsm" (FGSM with
            random start, Wong et al. 2020 "fast AT").
        epochs: passes over the training split.
        batch_size: training batch size.
        lr, momentum, weight_decay: optimiser settings (momentum is ignored by Adam).
        optimizer: "sgd" or "adam".
        scheduler: "cosine" (per step, to 0), "constant", or "step" (x0.1 at 50 % and 75 %).
        norm: threat model of the training attack, "Linf" or "L2".
        eps: training radius.
        alpha: attack step size; None -> ``2.5 * eps / steps`` (pgd, trades) or ``1.25 * eps``
            (fgsm).
        steps: attack iterations (pgd, trades).
        trades_beta: weight of TRADES' KL term.
        seed: seeds torch, numpy, python ``random`` and the data order.
    """

    mode: str = "pgd"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    scheduler: str = "cosine"
    norm: str = "Linf"
    eps: float = 8 / 255
    alpha: Optional[float] = None
    steps: int = 10
    trades_beta: float = 6.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        if self.mode not in MODES:
            raise bad("mode", f"one of {MODES}")
        if self.optimizer not in _OPTIMIZERS:
            raise bad("optimizer", f"one of {_OPTIMIZERS}")
        if self.scheduler not in _SCHEDULERS:
            raise bad("scheduler", f"one of {_SCHEDULERS}")
        if self.norm not in NORMS:
            raise bad("norm", f"one of {NORMS}")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise bad("epochs", "an int >= 0")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise bad("batch_size", "an int > 0")
        if not isinstance(self.steps, int) or self.steps <= 0:
            raise bad("steps", "an int > 0")
        for name in ("lr", "momentum", "weight_decay", "eps", "trades_beta"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise bad(name, "a finite number >= 0")
        if self.alpha is not None and (not isinstance(self.alpha, (int, float)) or self.alpha < 0):
            raise bad("alpha", "None or a number >= 0")

    def attack_alpha(self) -> float:
        """The step size actually used by the training attack."""
        if self.alpha is not None:
            return float(self.alpha)
        return 1.25 * self.eps if self.mode == "fgsm" else 2.5 * self.eps / self.steps


@dataclass
class TrainLog:
    """Per-epoch record returned by :func:`train`.

    ``train_acc`` is the accuracy of the predictions the loss was computed on: adversarial
    examples for "pgd" / "fgsm", clean inputs for "natural" / "trades", and clean inputs (eval
    mode) when a custom ``loss_fn`` is used. ``time`` is seconds per epoch.
    """

    epoch: List[int] = field(default_factory=list)
    loss: List[float] = field(default_factory=list)
    train_acc: List[float] = field(default_factory=list)
    time: List[float] = field(default_factory=list)
    lr: List[float] = field(default_factory=list)
    steps: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainLog":
        return cls(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items()})


# ----------------------------------------------------------------------------- attacks / losses
@contextlib.contextmanager
def _attack_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _trades_adv(model: nn.Module, x: Tensor, config: TrainConfig) -> Tensor:
    """TRADES' inner maximisation of KL(f(x') || f(x)) from a small Gaussian start."""
    eps, alpha = float(config.eps), config.attack_alpha()
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    delta = 0.001 * torch.randn_like(x)
    view = (-1,) + (1,) * (x.dim() - 1)
    for _ in range(config.steps):
        delta.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x + delta), dim=1), p_clean, reduction="sum")
        grad, = torch.autograd.grad(kl, delta)
        with torch.no_grad():
            if config.norm == "Linf":
                step = alpha * grad.sign()
            else:
                step = alpha * grad / _lp_norm(grad, "L2").clamp_min(1e-12).view(view)
            delta = _project(delta + step, config.norm, eps)
            delta = (x + delta).clamp(0, 1) - x
        delta = delta.detach()
    return (x + delta).detach()


def adversarial_examples(model: nn.Module, x: Tensor, y: Tensor, config: TrainConfig) -> Tensor:
    """The training attack of ``config.mode`` (``x`` itself for "natural"), computed in eval mode.

    "pgd": PGD with random start, ``config.steps`` steps, final iterate. "fgsm": one signed (or
    L2-normalised) gradient step of size ``alpha`` from a uniform random start, projected.
    "trades": TRADES' KL maximisation.
    """
    if config.mode == "natural" or config.eps == 0:
        return x
    with _attack_mode(model):
        if config.mode == "pgd":
            return pgd(model, x, y, norm=config.norm, eps=config.eps, alpha=config.attack_alpha(),
                       steps=config.steps, restarts=1, random_start=True, keep_best=False)
        if config.mode == "fgsm":
            return pgd(model, x, y, norm=config.norm, eps=config.eps, alpha=config.attack_alpha(),
                       steps=1, restarts=1, random_start=True, keep_best=False)
        return _trades_adv(model, x, config)


def _mode_loss_and_logits(model: nn.Module, x: Tensor, y: Tensor,
                          config: TrainConfig) -> Tuple[Tensor, Tensor]:
    if config.mode == "trades":
        x_adv = adversarial_examples(model, x, y, config)
        logits = model(x)
        robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1),
                          reduction="batchmean")
        return F.cross_entropy(logits, y) + config.trades_beta * robust, logits
    x_in = adversarial_examples(model, x, y, config)
    logits = model(x_in)
    return F.cross_entropy(logits, y), logits


def mode_loss(model: nn.Module, x: Tensor, y: Tensor, config: TrainConfig) -> Tensor:
    """The standard training loss of ``config.mode`` on one batch.

    Adversarial examples are generated in eval mode; the returned loss is computed in the
    model's current mode (train mode inside :func:`train`).

    Args:
        model: the classifier.
        x: images in [0, 1]; y: labels.
        config: supplies mode, norm, eps, alpha, steps and trades_beta.

    Returns:
        Scalar loss tensor (mean over the batch) with a graph to the parameters.
    """
    return _mode_loss_and_logits(model, x, y, config)[0]


def _batches_of(loader_or_data, batch_size: int = 256) -> Iterable[Tuple[Tensor, Tensor]]:
    if isinstance(loader_or_data, (tuple, list)) and len(loader_or_data) == 2 \
            and all(isinstance(t, Tensor) for t in loader_or_data):
        x, y = loader_or_data
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    if hasattr(loader_or_data, "loader") and hasattr(loader_or_data, "test"):
        return loader_or_data.loader("test", batch_size=batch_size, shuffle=False)
    return loader_or_data


@torch.no_grad()
def accuracy(model: nn.Module, loader_or_data, *, batch_size: int = 256) -> float:
    """Clean accuracy in eval mode (the model's mode is restored).

    Args:
        model: the classifier.
        loader_or_data: a DatasetBundle (its test split), a DataLoader / iterable of ``(x, y)``
            batches, or an ``(x, y)`` tensor pair.
        batch_size: for bundles and tensor pairs.
    """
    device = _device_of(model)
    correct = total = 0
    with _attack_mode(model):
        for x, y in _batches_of(loader_or_data, batch_size):
            x, y = x.to(device), y.to(device)
            correct += int((model(x).argmax(1) == y).sum())
            total += int(y.numel())
    if total == 0:
        raise ValueError("loader_or_data yielded no samples")
    return correct / total


# ----------------------------------------------------------------------------- seeding / checkpoints
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _rng_state() -> Dict[str, Any]:
    # Stored as tensors / plain lists so that the checkpoint loads with weights_only=True.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(s: Dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _save_checkpoint(path: Path, *, model, optimizer, scheduler, params, epoch, log, config) -> None:
    state = {
        "format": "apb_sparse.train/1",
        "epoch": epoch,
        "model": model.state_dict(),
        "params": [p.detach().cpu() for p in params],
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": _rng_state(),
        "log": log.to_dict(),
        "config": asdict(config),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def _load_checkpoint(path: Path, *, model, optimizer, scheduler, params, config) -> Tuple[int, TrainLog]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != "apb_sparse.train/1":
        raise ValueError(f"checkpoint {path} was not written by apb_sparse.train.train")
    saved = state["config"]
    # Every setting that changes what the resumed epochs compute must match (a checkpoint of a
    # different run would otherwise be continued silently).
    for k in ("mode", "epochs", "batch_size", "lr", "momentum", "weight_decay", "optimizer", "scheduler",
              "norm", "eps", "alpha", "steps", "trades_beta", "seed"):
        if saved.get(k) != getattr(config, k):
            raise ValueError(f"checkpoint {path} has {k}={saved.get(k)!r} but config has "
                             f"{k}={getattr(config, k)!r}; refusing to resume a different run")
    model.load_state_dict(state["model"], strict=True)
    if len(state["params"]) != len(params):
        raise ValueError(f"checkpoint {path} holds {len(state['params'])} optimised tensors, "
                         f"params has {len(params)}")
    with torch.no_grad():
        for p, q in zip(params, state["params"]):
            p.copy_(q)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return int(state["epoch"]), TrainLog.from_dict(state["log"])


# ----------------------------------------------------------------------------- the loop
def _make_optimizer(params: List[Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _make_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int):
    total = max(1, config.epochs * steps_per_epoch)
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[total // 2, (3 * total) // 4], gamma=0.1)
    return None


def _epoch_loader(data, config: TrainConfig, epoch: int):
    if hasattr(data, "loader"):
        # The order of epoch e depends only on (seed, e), so a resumed run sees the same batches.
        return data.loader("train", batch_size=config.batch_size, shuffle=True,
                           seed=config.seed * 1_000_003 + epoch)
    return data


def train(model: nn.Module, data, config: Optional[TrainConfig] = None, *,
          params: Optional[Iterable[Tensor]] = None, loss_fn: Optional[LossFn] = None,
          extra_loss: Optional[LossFn] = None,
          on_step: Optional[Callable[[int, nn.Module], None]] = None,
          on_epoch_end: Optional[Callable[[int, nn.Module, TrainLog], None]] = None,
          checkpoint: Union[str, os.PathLike, None] = None, resume: bool = False,
          progress: bool = True) -> TrainLog:
    """Train ``model`` in place with the recipe of ``config``.

    Args:
        model: the network (dense or with masked layers); trained on its own device.
        data: a :class:`~apb_sparse.data.DatasetBundle` (its ``loader("train", ...)`` is rebuilt
            every epoch with a seed derived from ``config.seed`` and the epoch), or any re-iterable
            of ``(x, y)`` batches such as a DataLoader (then the caller owns its order; resume is
            exact only if that order is deterministic).
        config: :class:`TrainConfig` (default ``TrainConfig()``).
        params: tensors to optimise (default: every parameter with ``requires_grad``); score-based
            pruning passes only its score tensors. They are saved in the checkpoint.
        loss_fn: ``loss_fn(model, x, y) -> Tensor``; replaces the mode's loss (it may call
            :func:`mode_loss` / :func:`adversarial_examples`).
        extra_loss: ``extra_loss(model, x, y) -> Tensor``, added to the loss every step.
        on_step: ``on_step(step, model)`` after every optimiser step and mask re-application;
            ``step`` counts from 0 across epochs.
        on_epoch_end: ``on_epoch_end(epoch, model, log)`` after every epoch (before the
            checkpoint is written, so changes it makes are saved).
        checkpoint: file written at the end of every epoch (``torch.save`` of state dicts, RNG
            states and the log; loads with ``weights_only=True``).
        resume: continue from ``checkpoint`` if the file exists (else start fresh). The result
            equals an uninterrupted run on the same device.
        progress: show tqdm progress bars.

    Returns:
        The :class:`TrainLog` (including epochs restored from the checkpoint). The model is left
        in the train/eval mode it came in.

    Raises:
        ValueError: invalid config, ``resume`` without ``checkpoint``, empty ``params``, or a
            checkpoint of a different run.
    """
    from tqdm.auto import tqdm

    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not params:
        raise ValueError("params is empty: nothing to optimise")
    for p in params:
        if not isinstance(p, Tensor) or not p.requires_grad:
            raise ValueError("every entry of params must be a tensor with requires_grad=True")

    _seed_everything(config.seed)
    was_training = model.training
    device = _device_of(model)
    masked = [layer for _, layer in masked_layers(model)]
    optimizer = _make_optimizer(params, config)
    first_loader = _epoch_loader(data, config, 0)
    try:
        steps_per_epoch = len(first_loader)
    except TypeError:
        steps_per_epoch = sum(1 for _ in first_loader)
    scheduler = _make_scheduler(optimizer, config, steps_per_epoch)

    log = TrainLog()
    start_epoch = 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if resume and ckpt is not None and ckpt.is_file():
        start_epoch, log = _load_checkpoint(ckpt, model=model, optimizer=optimizer,
                                            scheduler=scheduler, params=params, config=config)
    step = log.steps
    with torch.no_grad():
        for layer in masked:
            layer.apply_mask_()

    for epoch in range(start_epoch, config.epochs):
        model.train()
        t0 = time.perf_counter()
        loader = first_loader if epoch == 0 else _epoch_loader(data, config, epoch)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs} [{config.mode}]",
                   disable=not progress, leave=False)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if loss_fn is not None:
                loss = loss_fn(model, x, y)
                logits = None
            else:
                loss, logits = _mode_loss_and_logits(model, x, y, config)
            if extra_loss is not None:
                loss = loss + extra_loss(model, x, y)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss {float(loss)} at epoch {epoch}, step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            with torch.no_grad():
                for layer in masked:
                    layer.apply_mask_()
            if on_step is not None:
                on_step(step, model)
            step += 1
            with torch.no_grad():
                if logits is None:
                    with _attack_mode(model):
                        logits = model(x)
                correct += int((logits.argmax(1) == y).sum())
            seen += int(y.numel())
            loss_sum += float(loss.detach()) * int(y.numel())
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        log.epoch.append(epoch)
        log.loss.append(loss_sum / max(1, seen))
        log.train_acc.append(correct / max(1, seen))
        log.time.append(time.perf_counter() - t0)
        log.lr.append(float(optimizer.param_groups[0]["lr"]))
        log.steps = step
        if on_epoch_end is not None:
            on_epoch_end(epoch, model, log)
        if ckpt is not None:
            _save_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler,
                             params=params, epoch=epoch + 1, log=log, config=config)
    model.train(was_training)
    return log
