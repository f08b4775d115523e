"""timm models by name (``get_model("timm:resnet18")``), with our input normalisation in front.

timm (https://github.com/huggingface/pytorch-image-models) is an optional dependency:
``pip install timm`` or ``pip install apb_sparse[timm]``.  The model is built with
``timm.create_model(name, pretrained=False, num_classes=..., in_chans=...)`` (pass
``{"pretrained": true}`` in the options to download timm's weights, which needs internet) and
wrapped so that it takes [0, 1] images like every model here: ``normalize`` then ``model``.

:func:`apb_sparse.sparsify` converts the plain ``nn.Conv2d`` / ``nn.Linear`` layers of a timm
CNN and keeps any subclass it cannot prove equivalent (``StdConv2d``, ``Conv2dSame``, ...) dense,
recording why; transformers run, but their attention projections are the only sparse layers.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor, nn

from .common import check_classes, make_normalize

__all__ = ["TimmModel", "timm_model", "timm_available", "adapt_state_dict", "PREFIX"]

PREFIX = "timm:"


def timm_available() -> bool:
    """True when ``import timm`` works."""
    try:
        import timm  # noqa: F401
    except Exception:
        return False
    return True


class TimmModel(nn.Module):
    """``normalize`` followed by a timm model (``model``).

    Args:
        name: a timm model name (``timm.list_models()``), without the ``timm:`` prefix.
        num_classes, in_channels: passed to timm as ``num_classes`` / ``in_chans``.
        mean, std: input normalisation (default: the CIFAR-10 statistics for 3 channels, 0.5 / 0.5
            otherwise, as for the other models; a ``pretrained`` timm model gets timm's own).
        **kw: further ``timm.create_model`` options (``pretrained``, ``drop_rate``, ...).
    """

    def __init__(self, name: str, num_classes: int = 10, in_channels: int = 3, *,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None, **kw):
        super().__init__()
        check_classes(num_classes)
        try:
            import timm
        except ImportError:
            raise ImportError(f"arch {PREFIX}{name} needs timm: pip install timm (or apb_sparse[timm])") from None
        if not isinstance(name, str) or not name:
            raise ValueError(f"expected a timm model name after {PREFIX!r}, got {name!r}")
        if not timm.is_model(name):
            close = timm.list_models(f"*{name}*")[:8]
            raise ValueError(f"unknown timm model {name!r}" + (f"; similar names: {close}" if close else
                                                                "; see timm.list_models()"))
        kw.setdefault("pretrained", False)
        try:
            model = timm.create_model(name, num_classes=num_classes, in_chans=in_channels, **kw)
        except TypeError as e:
            raise TypeError(f"timm model {name!r} refused its options {sorted(kw)}: {e}") from None
        if kw["pretrained"] and mean is None and std is None:
            cfg = getattr(model, "pretrained_cfg", None) or {}
            mean, std = cfg.get("mean"), cfg.get("std")
        self.timm_name = name
        self.normalize = make_normalize(in_channels, mean, std)
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.normalize(x))


def timm_model(name: str, num_classes: int = 10, in_channels: int = 3, **kw) -> TimmModel:
    """Build ``timm:<name>``; see :class:`TimmModel`."""
    return TimmModel(name, num_classes, in_channels, **kw)


def adapt_state_dict(state: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    """A state dict saved from a bare timm model (``model.state_dict()`` in timm's own names) gets
    the ``model.`` prefix of :class:`TimmModel`; one of ours is returned unchanged."""
    if any(k.startswith("model.") for k in state) or not state:
        return dict(state), []
    return {("model." + k if k not in ("normalize.mean", "normalize.std") else k): v
            for k, v in state.items()}, ["keys of a bare timm model: prefixed with 'model.'"]
