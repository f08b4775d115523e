"""Deployment layers: weights stored as CSR nonzeros (unstructured) or as the dense block of the
kept channels (structured).  Both support backward-to-input, so attacks run on deployed models."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops

__all__ = ["SparseConv2d", "SparseLinear", "ChannelSparseConv2d"]


def _layer_mask_weight(layer: nn.Module, mask: Optional[Tensor]) -> Tensor:
    """The effective weight of a dense or masked layer, times ``mask`` if given."""
    weight = layer.weight.detach()
    if hasattr(layer, "get_mask"):
        weight = weight * layer.get_mask().detach()
    if mask is not None:
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the weight's shape {tuple(weight.shape)}")
        if mask.device != weight.device:
            raise ValueError(f"mask is on {mask.device}, expected the weight's device {weight.device}")
        weight = weight * mask.to(weight.dtype)
    return weight


class _CsrMixin:
    """Shared CSR storage: ``values``, ``row_ptr``, ``col_idx`` buffers whose sizes follow the
    number of nonzeros, so load_state_dict accepts any nonzero count."""

    values: Tensor
    row_ptr: Tensor
    col_idx: Tensor

    def _set_csr(self, weight: Tensor) -> None:
        values, row_ptr, col_idx = ops.pack_csr(weight)
        self.register_buffer("values", values)
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("col_idx", col_idx)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in ("values", "row_ptr", "col_idx"):
            key = prefix + name
            if key in state_dict:
                src = state_dict[key]
                cur = getattr(self, name)
                if src.dtype != cur.dtype and name != "values":
                    error_msgs.append(f"{key}: expected dtype {cur.dtype}, got {src.dtype}")
                    continue
                setattr(self, name, torch.empty(src.shape, dtype=cur.dtype, device=cur.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @property
    def nnz(self) -> int:
        """Number of stored nonzeros."""
        return int(self.values.numel())

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights."""
        total = 1
        for s in self.weight_shape:
            total *= s
        return 1.0 - self.nnz / max(1, total)


class SparseConv2d(_CsrMixin, nn.Module):
    """Convolution whose weight is stored as CSR nonzeros and run by the sparse kernel.

    Build with :meth:`from_dense`; :meth:`to_dense` gives back an ``nn.Conv2d``.
    The state_dict stores only the nonzeros (``values``, ``row_ptr``, ``col_idx``) and the bias.
    """

    path = "unstructured"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Tuple[int, int],
                 stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1, bias: bool = True,
                 *, weight: Optional[Tensor] = None, device=None, dtype=None):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size = tuple(ops._pair("kernel_size", kernel_size, 1))
        self.stride = tuple(ops._pair("stride", stride, 1))
        self.padding = tuple(ops._pair("padding", padding, 0))
        self.dilation = tuple(ops._pair("dilation", dilation, 1))
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                             f"by groups ({groups})")
        shape = self.weight_shape
        if weight is None:
            weight = torch.zeros(shape, device=device, dtype=dtype or torch.get_default_dtype())
        elif tuple(weight.shape) != shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {shape}")
        self._set_csr(weight)
        self.bias = nn.Parameter(torch.zeros(out_channels, device=weight.device, dtype=weight.dtype)) if bias else None
        # Set by apb_sparse.fuse: apply ReLU in the kernel's epilogue.
        self.fused_relu = False
        self._args = (list(self.weight_shape), list(self.stride), list(self.padding), list(self.dilation))

    @property
    def weight_shape(self) -> Tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: Optional[Tensor] = None) -> "SparseConv2d":
        """From an ``nn.Conv2d`` (or MaskedConv2d): keeps the nonzeros of ``weight * mask``."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"conv: only zero padding with explicit sizes is supported, got padding="
                             f"{conv.padding!r}, padding_mode={conv.padding_mode!r}")
        weight = _layer_mask_weight(conv, mask)
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, weight=weight)
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias)
        return layer

    def to_dense(self) -> nn.Conv2d:
        """An equivalent ``nn.Conv2d``."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, device=self.values.device,
                         dtype=self.values.dtype)
        with torch.no_grad():
            conv.weight.copy_(ops.unpack_csr(self.values, self.row_ptr, self.col_idx, self.weight_shape))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """``conv(input)``, or ``relu(conv(input) + residual)`` style fusions set up by apb_sparse.fuse."""
        if not isinstance(input, Tensor) or input.dim() != 4:
            raise ValueError(f"input must be a 4-D tensor (N, C, H, W), got "
                             f"{tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__}")
        weight_shape, stride, padding, dilation = self._args
        # The op itself validates every argument; calling it directly keeps per-layer Python
        # overhead low, which matters at batch 1 where a sparse layer takes tens of microseconds.
        return torch.ops.apb_sparse.sparse_conv2d(input, self.values, self.row_ptr, self.col_idx, weight_shape,
                                                  self.bias, stride, padding, dilation, self.groups, residual,
                                                  self.fused_relu)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, nnz={self.nnz}, sparsity={self.sparsity:.3f}"
                + (", fused_relu=True" if self.fused_relu else ""))


class SparseLinear(_CsrMixin, nn.Module):
    """Linear layer whose weight is stored as CSR nonzeros. :meth:`from_dense` / :meth:`to_dense`."""

    path = "unstructured"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight: Optional[Tensor] = None, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        if weight is None:
            weight = torch.zeros(self.weight_shape, device=device, dtype=dtype or torch.get_default_dtype())
        elif tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {self.weight_shape}")
        self._set_csr(weight)
        self.bias = nn.Parameter(torch.zeros(out_features, device=weight.device, dtype=weight.dtype)) if bias else None

    @property
    def weight_shape(self) -> Tuple[int, int]:
        return (self.out_features, self.in_features)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Optional[Tensor] = None) -> "SparseLinear":
        """From an ``nn.Linear`` (or MaskedLinear): keeps the nonzeros of ``weight * mask``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = _layer_mask_weight(linear, mask)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight=weight)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def to_dense(self) -> nn.Linear:
        """An equivalent ``nn.Linear``."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.values.device,
                        dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(ops.unpack_csr(self.values, self.row_ptr, self.col_idx, self.weight_shape))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, input: Tensor) -> Tensor:
        return ops.sparse_linear(input, self.values, self.row_ptr, self.col_idx, self.in_features, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, " \
               f"sparsity={self.sparsity:.3f}"


class ChannelSparseConv2d(nn.Module):
    """Structured path: only the kept output filters and input channels are stored, as a dense
    block, and computed by the dense kernel on the gathered input channels.  Dropped output
    channels produce their bias (zero without bias), like the masked dense layer.

    Only ``groups == 1``.  For physically smaller models use :func:`apb_sparse.compact`.
    """

    path = "structured"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=(1, 1), padding=(0, 0),
                 dilation=(1, 1), bias: bool = True, *, out_index: Tensor, in_index: Tensor, weight: Tensor):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = tuple(ops._pair("kernel_size", kernel_size, 1))
        self.stride = tuple(ops._pair("stride", stride, 1))
        self.padding = tuple(ops._pair("padding", padding, 0))
        self.dilation = tuple(ops._pair("dilation", dilation, 1))
        self.groups = 1
        expected = (out_index.numel(), in_index.numel(), *self.kernel_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {expected}")
        self.register_buffer("out_index", out_index.to(torch.int64).contiguous())
        self.register_buffer("in_index", in_index.to(torch.int64).contiguous())
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=weight.dtype, device=weight.device)) if bias else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The kept-channel counts may differ from this instance's: adopt the stored shapes.
        for name in ("out_index", "in_index"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        if prefix + "weight" in state_dict:
            self.weight = nn.Parameter(torch.empty_like(state_dict[prefix + "weight"], device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def weight_shape(self) -> Tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def nnz(self) -> int:
        return int(self.weight.count_nonzero())

    @property
    def sparsity(self) -> float:
        total = self.out_channels * self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        return 1.0 - self.nnz / max(1, total)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: Optional[Tensor] = None) -> "ChannelSparseConv2d":
        """Keep the output filters and input channels of ``weight * mask`` that have a nonzero."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"conv: the structured path needs groups == 1, got groups={conv.groups}")
        weight = _layer_mask_weight(conv, mask)
        nz = weight != 0
        out_index = nz.flatten(1).any(1).nonzero().flatten()
        in_index = nz.transpose(0, 1).flatten(1).any(1).nonzero().flatten()
        block = weight.index_select(0, out_index).index_select(1, in_index)
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.bias is not None, out_index=out_index, in_index=in_index, weight=block)
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias)
        return layer

    def to_dense(self) -> nn.Conv2d:
        """An equivalent ``nn.Conv2d``."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, 1, self.bias is not None, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[self.out_index[:, None], self.in_index[None, :]] = self.weight
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4:
            raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
        x = input.index_select(1, self.in_index) if self.in_index.numel() < self.in_channels else input
        if self.in_index.numel() == 0 or self.out_index.numel() == 0:
            n, _, oh, ow = ops.conv_output_size(input.shape, self.weight_shape, self.stride, self.padding,
                                                self.dilation)
            y = input.new_zeros((n, self.out_index.numel(), oh, ow))
        else:
            y = F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation)
        if self.out_index.numel() < self.out_channels:
            out = y.new_zeros((y.shape[0], self.out_channels, y.shape[2], y.shape[3]))
            y = out.index_copy(1, self.out_index, y)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, kept_out={self.out_index.numel()}, kept_in={self.in_index.numel()}")
