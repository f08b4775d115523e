"""Data and models of a benchmark cell: the device, the dataset, a freshly initialised model, the
recipe every method shares, and the dense base model of pipeline-A methods (trained once, cached)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..data import get_dataset
from ..methods import Recipe
from ..models import get_model
from ..train import train
from .checkpoint import load_checkpoint, save_checkpoint
from .presets import Preset
from .results import atomic_write_text


# ----------------------------------------------------------------------------------- setup
def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cuda" without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device(name)


def load_data(dataset: str, preset: Preset, data_dir: Optional[str] = None):
    return get_dataset(dataset, data_dir=data_dir, train_subset=preset.train_subset)


def build_model(preset: Preset, arch: str, data, seed: int) -> nn.Module:
    """A freshly initialised ``arch`` under ``seed``, sized for ``data``, with its statistics."""
    kw = preset.model_kwargs_for(arch)
    if getattr(data, "mean", ()):
        kw.update(mean=data.mean, std=data.std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_model(arch, num_classes=int(data.num_classes), in_channels=int(data.input_shape[0]), **kw)


def make_recipe(preset: Preset, arch: str, dataset: str, seed: int, *, progress: bool = False):
    """The recipe every method shares (``pretrain_epochs`` = the base model's epochs)."""
    kw = dict(preset.recipe)
    return Recipe(arch=arch, dataset=dataset, norm=preset.norm, eps=preset.eps,
                  pretrain_epochs=preset.base_epochs, prune_epochs=preset.prune_epochs,
                  finetune_epochs=preset.finetune_epochs, seed=seed, progress=progress, **kw)


def _base_path(out_dir: Path, preset: Preset, arch: str, dataset: str, seed: int) -> Path:
    return out_dir / "base" / f"{dataset}-{arch}-seed{seed}-{preset.identity_hash()}.safetensors"


def get_base_model(preset: Preset, arch: str, dataset: str, data, seed: int, out_dir: Path, *,
                   device: torch.device, progress: bool = True, log: Callable[[str], None] = print
                   ) -> Tuple[nn.Module, Dict[str, Any]]:
    """The dense adversarially trained base model: loaded from ``OUT/base/`` or trained and cached."""
    path = _base_path(out_dir, preset, arch, dataset, seed)
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        model, _ = load_checkpoint(path)
        info = json.loads(info_path.read_text())
        log(f"[base] loaded {path} (trained in {info.get('train_seconds', float('nan')):.1f} s)")
        return model.to(device), info
    recipe = make_recipe(preset, arch, dataset, seed, progress=progress)
    model = build_model(preset, arch, data, seed).to(device)
    log(f"[base] adversarially training dense {arch} on {dataset}: {preset.base_epochs} epochs "
        f"{recipe.mode.upper()} {preset.norm} eps={preset.eps:.4g} steps={recipe.steps} on {device}")
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tlog = train(model, data, recipe.train_config(preset.base_epochs, lr=recipe.lr), progress=progress)
    seconds = time.perf_counter() - t0
    model.eval()
    info = {"arch": arch, "dataset": dataset, "seed": seed, "epochs": preset.base_epochs,
            "train_seconds": seconds, "train_log": tlog.to_dict(), "preset_identity": preset.identity()}
    save_checkpoint(model, path, arch=arch, num_classes=int(data.num_classes),
                    in_channels=int(data.input_shape[0]), model_kwargs=preset.model_kwargs_for(arch),
                    extra={"role": "dense base model"})
    atomic_write_text(info_path, json.dumps(info, indent=1, default=str))
    log(f"[base] trained in {seconds:.1f} s, cached in {path}")
    return model, info
