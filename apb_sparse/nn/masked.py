"""Masked layers used while training and pruning.

A masked layer keeps a dense ``weight`` parameter and a ``weight_mask`` buffer of the same shape
(1 = kept, 0 = pruned).  The layer computes with ``weight * mask``.  Pruning methods either edit
``weight_mask`` directly or install a ``mask_fn`` (for example a straight-through top-k over
learnable scores), in which case the mask returned by ``mask_fn(layer)`` is used and gradients
flow into whatever produced it.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from . import _conv

__all__ = ["MaskedConv2d", "MaskedLinear", "MaskedLayer", "masked_layers", "to_masked"]

# Above this fraction of kept weights the masked training layers use the dense vendor kernel:
# the sparse kernel only wins once most taps are skipped (measured in benchmarks/latency.py).
DENSE_KERNEL_DENSITY = 0.5


class _MaskMixin:
    weight: nn.Parameter
    weight_mask: Tensor
    mask_fn: Optional[Callable[["_MaskMixin"], Tensor]]

    def _init_mask(self, mask: Optional[Tensor]) -> None:
        if mask is None:
            mask = torch.ones_like(self.weight)
        mask = _check_mask(mask, self.weight)
        self.register_buffer("weight_mask", mask.detach().to(self.weight.dtype).clone())
        self.mask_fn = None

    def get_mask(self) -> Tensor:
        """The mask the forward pass uses: ``mask_fn(self)`` if one is installed, else ``weight_mask``."""
        if self.mask_fn is not None:
            return self.mask_fn(self)
        return self.weight_mask

    @torch.no_grad()
    def set_mask(self, mask: Tensor) -> None:
        """Replace the mask (0/1 tensor shaped like ``weight``) and zero the pruned weights.

        Only binary masks are accepted: a soft (real-valued) mask belongs in a ``mask_fn``, which
        the forward pass multiplies in without changing the stored weights.
        """
        mask = _check_mask(mask, self.weight)
        if bool(((mask != 0) & (mask != 1)).any()):
            bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
            raise ValueError(f"mask must hold only 0 and 1 (got {bad!r}); install a mask_fn for soft masks")
        self.weight_mask.copy_(mask.to(self.weight_mask.dtype))
        self.apply_mask_()

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zero the stored weights where the mask is 0, so pruned weights are exactly zero.

        Kept weights are left as they are (whatever the mask's nonzero value), so calling it twice,
        or on a mask edited in place, never scales the weights.
        """
        self.weight.masked_fill_(self.weight_mask == 0, 0)

    @property
    def sparsity(self) -> float:
        """Fraction of pruned entries of ``weight_mask``."""
        return 1.0 - float(self.weight_mask.count_nonzero()) / max(1, self.weight_mask.numel())

    def _effective(self) -> Tuple[Tensor, Tensor]:
        return self.weight, self.get_mask()


def _check_mask(mask: Tensor, weight: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the weight's shape {tuple(weight.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"mask is on {mask.device}, expected the weight's device {weight.device}")
    if mask.dtype == torch.bool:
        mask = mask.to(weight.dtype)
    if not mask.is_floating_point():
        raise TypeError(f"mask must be bool or floating point, got {mask.dtype}")
    return mask


class MaskedConv2d(_MaskMixin, nn.Conv2d):
    """``nn.Conv2d`` computing with ``weight * mask`` (training layer of every pruning method).

    Args: as ``nn.Conv2d`` (every padding and ``padding_mode``, unbatched 3-D inputs) plus
    ``mask`` (optional tensor shaped like the weight; default all ones).

    Below :data:`DENSE_KERNEL_DENSITY` kept weights the sparse kernel computes with the kept
    weights only; above it ``F.conv2d`` computes with ``weight * mask``.  The two agree for finite
    inputs; a non-finite input value at a pruned tap reaches the output only on the dense path
    (``0 * nan = nan``).
    """

    def __init__(self, *args, mask: Optional[Tensor] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask(mask)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: Optional[Tensor] = None) -> "MaskedConv2d":
        """Wrap a dense ``nn.Conv2d`` (weights copied). ``mask`` defaults to all ones."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype,
                    mask=mask)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.train(conv.training)
        return layer

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding ``weight * mask``."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=self.groups,
                         bias=self.bias is not None, padding_mode=self.padding_mode,
                         device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight * self.get_mask())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    def forward(self, input: Tensor) -> Tensor:
        weight, mask = self._effective()
        if ops.available() and isinstance(input, Tensor) and input.dim() in (3, 4) \
                and _density(mask) < DENSE_KERNEL_DENSITY:
            x, unbatched = _conv.batched(input, "MaskedConv2d")
            # Computed per call: nn.Conv2d's attributes are public and may be changed after
            # construction (a few dozen microseconds, small next to a training step).
            plan = _conv.padding_plan(self.kernel_size, self.stride, self.padding, self.dilation, self.padding_mode)
            out = ops.masked_conv2d(plan.apply(x), weight, mask, self.bias, self.stride, plan.kernel,
                                    self.dilation, self.groups)
            return out.squeeze(0) if unbatched else out
        return self._conv_forward(input, weight * mask, self.bias)


class MaskedLinear(_MaskMixin, nn.Linear):
    """``nn.Linear`` computing with ``weight * mask``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 mask: Optional[Tensor] = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_mask(mask)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Optional[Tensor] = None) -> "MaskedLinear":
        """Wrap a dense ``nn.Linear`` (weights copied). ``mask`` defaults to all ones."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    mask=mask, device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.train(linear.training)
        return layer

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``weight * mask``."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight * self.get_mask())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.train(self.training)
        return lin

    def forward(self, input: Tensor) -> Tensor:
        weight, mask = self._effective()
        return F.linear(input, weight * mask, self.bias)


MaskedLayer = (MaskedConv2d, MaskedLinear)


def _density(mask: Tensor) -> float:
    # A mask produced by mask_fn may require grad; counting is not differentiated.
    return float(mask.detach().count_nonzero()) / max(1, mask.numel())


def masked_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """Yield ``(name, layer)`` for every MaskedConv2d / MaskedLinear in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, MaskedLayer):
            yield name, module


def to_masked(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every ``nn.Conv2d`` / ``nn.Linear`` by its masked counterpart (all-ones masks)."""
    import copy

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, MaskedLayer):
                continue
            if type(child) is nn.Conv2d:
                setattr(parent, child_name, MaskedConv2d.from_dense(child))
            elif type(child) is nn.Linear:
                setattr(parent, child_name, MaskedLinear.from_dense(child))
    if isinstance(model, (nn.Conv2d, nn.Linear)) and not isinstance(model, MaskedLayer):
        model = (MaskedConv2d if isinstance(model, nn.Conv2d) else MaskedLinear).from_dense(model)
    return model
