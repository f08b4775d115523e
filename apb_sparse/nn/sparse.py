"""Deployment layers: weights stored as CSR nonzeros (unstructured) or as the dense block of the
kept channels (structured).  Both support backward-to-input, so attacks run on deployed models."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from . import _conv
from .pool import MaxPool2x2

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


def _check_index(name: str, index: Tensor, size: int) -> None:
    """``index`` must be a 1-D integer tensor of distinct, increasing channel numbers in [0, size)."""
    if not isinstance(index, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(index).__name__}")
    if index.dim() != 1 or index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor, got {index.dtype} of shape {tuple(index.shape)}")
    if index.numel() == 0:
        return
    i = index.to(torch.int64)
    if int(i.min()) < 0 or int(i.max()) >= size:
        raise ValueError(f"{name} has entries outside [0, {size})")
    if index.numel() > 1 and bool((i[1:] <= i[:-1]).any()):
        raise ValueError(f"{name} must be strictly increasing (each kept channel once)")


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
        keys = [prefix + name for name in ("values", "row_ptr", "col_idx")]
        present = [k in state_dict for k in keys]
        if any(present) and not all(present):
            # A partial CSR cannot be checked against the rest; load_state_dict reports the
            # missing keys (strict) and nothing is replaced.
            error_msgs.append(f"{prefix}: values, row_ptr and col_idx must be loaded together, got only "
                              f"{[k for k, p in zip(keys, present) if p]}")
            return
        if all(present):
            src = [state_dict[k] for k in keys]
            try:
                # Validated before anything is copied: a tampered row_ptr would otherwise change
                # the layer's output width, and a bad col_idx read out of bounds.
                ops.check_csr(*src, self.weight_shape, names=keys)
            except (TypeError, ValueError) as exc:
                error_msgs.append(str(exc))
                return
            for name, t in zip(("values", "row_ptr", "col_idx"), src):
                cur = getattr(self, name)
                setattr(self, name, torch.empty(t.shape, dtype=cur.dtype, device=cur.device))
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

    layout = "unstructured"
    path = layout  # the name of version 0.2
    #: Set by :func:`apb_sparse.deploy` (:func:`apb_sparse.fuse.fuse_pools`): an ``nn.MaxPool2d(2, 2)``
    #: after this conv, computed in the kernel's store pass.
    fused_pool = False
    #: Set by :func:`apb_sparse.deploy` (:func:`apb_sparse.fuse.fuse_pairs`): the conv whose output
    #: this conv reads, run together with it (``self(x)`` is then ``self(fused_prev(x))``); a plain
    #: attribute (not a submodule: the model holds it under ``fused_prev_name``).
    fused_prev: Optional["SparseConv2d"] = None
    fused_prev_name: Optional[str] = None
    #: Set with ``fused_prev`` (:func:`apb_sparse.fuse.fuse_pairs`): a 1x1 conv of ``fused_prev``'s
    #: input whose output is this conv's residual (ResNet's downsampling shortcut), run in the same
    #: call on the same input chunk.
    fused_shortcut: Optional["SparseConv2d"] = None
    fused_shortcut_name: Optional[str] = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Tuple[int, int],
                 stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1, bias: bool = True,
                 *, weight: Optional[Tensor] = None, padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        if self.in_channels < 0 or self.out_channels < 0 or self.groups < 1:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be >= 0 and "
                             f"groups ({groups}) >= 1")
        self.kernel_size = tuple(ops._pair("kernel_size", kernel_size, 1))
        self.stride = tuple(ops._pair("stride", stride, 1))
        self.padding = _conv.normalize_padding(padding)
        self.dilation = tuple(ops._pair("dilation", dilation, 1))
        self.padding_mode = padding_mode
        # Non-zero modes, "same" and "valid" become an explicit F.pad before the kernel.
        self._plan = _conv.padding_plan(self.kernel_size, self.stride, self.padding, self.dilation, padding_mode)
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
        self._args = (list(self.weight_shape), list(self.stride), list(self._plan.kernel), list(self.dilation))

    @property
    def weight_shape(self) -> Tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: Optional[Tensor] = None) -> "SparseConv2d":
        """From an ``nn.Conv2d`` (or MaskedConv2d): keeps the nonzeros of ``weight * mask``."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        weight = _layer_mask_weight(conv, mask)
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, weight=weight,
                    padding_mode=conv.padding_mode)
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias)
        return layer

    def to_dense(self) -> nn.Conv2d:
        """An equivalent ``nn.Conv2d``."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode,
                         device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            conv.weight.copy_(ops.unpack_csr(self.values, self.row_ptr, self.col_idx, self.weight_shape))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """``conv(input)`` (then ReLU if ``fused_relu``), or with ``residual``
        ``conv(input) + residual`` (then ReLU), the add in the kernel's epilogue when the sum
        keeps the conv output's shape, dtype and device (the fusions of apb_sparse.fuse); then
        ``F.max_pool2d(out, 2, 2)`` if ``fused_pool`` (in the kernel's store where nothing needs
        gradients).

        ``input``: ``(N, C, H, W)`` or unbatched ``(C, H, W)``; float16 / bfloat16 inputs are
        computed in float32.  Only the stored nonzeros are computed: a non-finite input value
        reaches only the outputs whose nonzero taps read it.
        """
        prev = self.fused_prev
        if prev is not None:
            shortcut = self.fused_shortcut
            if shortcut is not None and residual is not None:
                raise ValueError("this conv's residual is its fused shortcut conv: call it without residual")
            out = self._pair(prev, input, residual)
            if out is not None:
                return out
            if shortcut is not None:
                residual = shortcut(input)
            input = prev(input)
        if self.fused_pool:
            return self._pooled(input, residual)
        return self._epilogue(input, residual)

    def _pair(self, prev: "SparseConv2d", input, residual) -> Optional[Tensor]:
        """``self(prev(input), residual)`` in one ``apb_sparse::sparse_conv2d_pair`` call (the
        intermediate activation stays in the kernel's layout), or None where that does not apply:
        a call that records gradients, an input that is not a batched float32 / float64 CPU tensor,
        explicit padding, a residual the epilogue cannot take as it is."""
        sc = self.fused_shortcut
        if not (isinstance(input, Tensor) and input.dim() == 4 and input.dtype in ops.KERNEL_DTYPES
                and input.device.type == "cpu" and prev._plan.pre is None and self._plan.pre is None
                and not prev.fused_pool and prev.fused_prev is None and (sc is None or sc._plan.pre is None)):
            return None
        if residual is not None:
            n, _, h, w = input.shape
            shape = (n, self.out_channels, *self._out_hw(*prev._out_hw(h, w)))
            if not (isinstance(residual, Tensor) and tuple(residual.shape) == shape and residual.dtype == input.dtype
                    and residual.device == input.device):
                return None
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
                input, prev.values, prev.bias, self.values, self.bias, residual,
                *((sc.values, sc.bias) if sc is not None else ()))):
            return None
        w1, s1, p1, d1 = prev._args
        w2, s2, p2, d2 = self._args
        return ops.call_op(torch.ops.apb_sparse.sparse_conv2d_pair, input, prev.values, prev.row_ptr, prev.col_idx,
                           w1, prev.bias, s1, p1, d1, prev.groups, prev.fused_relu, self.values, self.row_ptr,
                           self.col_idx, w2, self.bias, s2, p2, d2, self.groups, residual, self.fused_relu,
                           self.fused_pool, *((sc.values, sc.row_ptr, sc.col_idx, sc.bias) if sc is not None else ()))

    def _pooled(self, input: Tensor, residual) -> Tensor:
        if residual is None and isinstance(input, Tensor) and input.dtype in ops.KERNEL_DTYPES and not (
                torch.is_grad_enabled() and (input.requires_grad or self.values.requires_grad
                                             or (self.bias is not None and self.bias.requires_grad))):
            return self._run(input, self.values, self.bias, None, self.fused_relu, max_pool=True)
        out = self._epilogue(input, residual)
        return MaxPool2x2.pool(out)  # F.max_pool2d's values (and gradients)

    def _epilogue(self, input: Tensor, residual) -> Tensor:
        if residual is None:
            return self._run(input, self.values, self.bias, None, self.fused_relu)
        kernel_residual = self._kernel_residual(input, residual)
        if kernel_residual is not None:
            return self._run(input, self.values, self.bias, kernel_residual, self.fused_relu)
        # Not exact in the epilogue (another dtype or device, a broadcast to a larger shape, a
        # non-tensor): computed unfused, with PyTorch's broadcasting and type promotion.
        out = self._run(input, self.values, self.bias, None, False) + residual
        return torch.relu(out) if self.fused_relu else out

    def _output_shape(self, input: Tensor) -> torch.Size:
        n, _, h, w = input.shape
        return torch.Size((n, self.out_channels, *self._out_hw(h, w)))

    def _out_hw(self, h: int, w: int) -> Tuple[int, int]:
        """Output height and width for an input of h x w."""
        if self.padding == "same":  # stride 1 (nn.Conv2d refuses "same" otherwise)
            return h, w
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        (ph, pw), (dh, dw) = (0, 0) if self.padding == "valid" else self.padding, self.dilation
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def _kernel_residual(self, input: Tensor, residual) -> Optional[Tensor]:
        """``residual`` as the kernel's epilogue takes it (the output's shape, dtype and device), or
        None when ``conv(input) + residual`` cannot be computed there exactly."""
        if not (isinstance(residual, Tensor) and isinstance(input, Tensor) and input.dim() == 4
                and residual.device == input.device):
            return None
        shape = self._output_shape(input)
        if residual.shape == shape and residual.dtype == input.dtype:
            return residual
        if torch.result_type(input, residual) != input.dtype:
            return None
        try:
            broadcast = torch.broadcast_shapes(shape, residual.shape)
        except RuntimeError:
            return None
        return residual.to(input.dtype).expand(shape).contiguous() if broadcast == shape else None

    def _run(self, input: Tensor, values: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
             relu: bool, max_pool: bool = False) -> Tensor:
        """The layer's computation with ``values`` / ``bias`` in place of the stored ones (the
        layer's CSR structure); :mod:`apb_sparse.fuse` passes BatchNorm-folded ones."""
        x, unbatched = _conv.batched(input, "SparseConv2d")
        if unbatched and isinstance(residual, Tensor):
            residual = residual.unsqueeze(0)
        x = self._plan.apply(x)
        weight_shape, stride, padding, dilation = self._args
        if x.dtype in ops.KERNEL_DTYPES:
            # The op itself validates every argument; calling it directly keeps per-layer Python
            # overhead low, which matters at batch 1 where a sparse layer takes tens of microseconds.
            out = ops.call_op(torch.ops.apb_sparse.sparse_conv2d, x, values, self.row_ptr, self.col_idx,
                              weight_shape, bias, stride, padding, dilation, self.groups, residual, relu,
                              max_pool)
        else:
            out = ops.sparse_conv2d(x, values, self.row_ptr, self.col_idx, weight_shape, bias, stride,
                                    padding, dilation, self.groups, residual, relu, max_pool)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, nnz={self.nnz}, sparsity={self.sparsity:.3f}"
                + (f", padding_mode={self.padding_mode!r}" if self.padding_mode != "zeros" else "")
                + (", fused_relu=True" if self.fused_relu else "")
                + (", fused_pool=True" if self.fused_pool else "")
                + (f", fused_prev={self.fused_prev_name!r}" if self.fused_prev is not None else "")
                + (f", fused_shortcut={self.fused_shortcut_name!r}" if self.fused_shortcut is not None else ""))


class SparseLinear(_CsrMixin, nn.Module):
    """Linear layer whose weight is stored as CSR nonzeros. :meth:`from_dense` / :meth:`to_dense`."""

    layout = "unstructured"
    path = layout  # the name of version 0.2

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight: Optional[Tensor] = None, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        if self.in_features < 0 or self.out_features < 0:
            raise ValueError(f"in_features ({in_features}) and out_features ({out_features}) must be >= 0")
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
    """Filter layout: only the kept output filters and input channels are stored, as a dense
    block, and computed by the dense kernel on the gathered input channels.  Dropped output
    channels produce their bias (zero without bias), like the masked dense layer.

    Only ``groups == 1``.  For physically smaller models use :func:`apb_sparse.compact`.
    """

    layout = "filter"
    path = layout  # the name of version 0.2

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=(1, 1), padding=(0, 0),
                 dilation=(1, 1), bias: bool = True, *, out_index: Tensor, in_index: Tensor, weight: Tensor,
                 padding_mode: str = "zeros"):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = tuple(ops._pair("kernel_size", kernel_size, 1))
        self.stride = tuple(ops._pair("stride", stride, 1))
        self.padding = _conv.normalize_padding(padding)
        self.dilation = tuple(ops._pair("dilation", dilation, 1))
        self.padding_mode = padding_mode
        self._plan = _conv.padding_plan(self.kernel_size, self.stride, self.padding, self.dilation, padding_mode)
        self.groups = 1
        expected = (out_index.numel(), in_index.numel(), *self.kernel_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {expected}")
        _check_index("out_index", out_index, self.out_channels)
        _check_index("in_index", in_index, self.in_channels)
        self.register_buffer("out_index", out_index.to(torch.int64).contiguous())
        self.register_buffer("in_index", in_index.to(torch.int64).contiguous())
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=weight.dtype, device=weight.device)) if bias else None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The kept-channel counts may differ from this instance's: adopt the stored shapes, once
        # they are checked against each other and against the layer's channel counts.
        keys = {name: prefix + name for name in ("out_index", "in_index", "weight")}
        if all(k in state_dict for k in keys.values()):
            out_index, in_index, weight = (state_dict[keys[n]] for n in ("out_index", "in_index", "weight"))
            try:
                _check_index(keys["out_index"], out_index, self.out_channels)
                _check_index(keys["in_index"], in_index, self.in_channels)
                expected = (out_index.numel(), in_index.numel(), *self.kernel_size)
                if tuple(weight.shape) != expected:
                    raise ValueError(f"{keys['weight']} has shape {tuple(weight.shape)}, expected {expected} "
                                     f"(kept output channels, kept input channels, kernel size)")
            except (TypeError, ValueError) as exc:
                error_msgs.append(str(exc))
                return
            for name in ("out_index", "in_index"):
                setattr(self, name, torch.empty_like(state_dict[keys[name]], device=getattr(self, name).device))
            self.weight = nn.Parameter(torch.empty_like(weight, device=self.weight.device))
        elif any(k in state_dict for k in keys.values()):
            error_msgs.append(f"{prefix}: out_index, in_index and weight must be loaded together")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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
            raise ValueError(f"conv: the filter layout needs groups == 1, got groups={conv.groups}")
        weight = _layer_mask_weight(conv, mask)
        nz = weight != 0
        out_index = nz.flatten(1).any(1).nonzero().flatten()
        in_index = nz.transpose(0, 1).flatten(1).any(1).nonzero().flatten()
        block = weight.index_select(0, out_index).index_select(1, in_index)
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.bias is not None, out_index=out_index, in_index=in_index, weight=block,
                    padding_mode=conv.padding_mode)
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias)
        return layer

    def to_dense(self) -> nn.Conv2d:
        """An equivalent ``nn.Conv2d``."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, 1, self.bias is not None, self.padding_mode, device=self.weight.device,
                         dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[self.out_index[:, None], self.in_index[None, :]] = self.weight
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def forward(self, input: Tensor) -> Tensor:
        """``input``: ``(N, C, H, W)`` or unbatched ``(C, H, W)``."""
        return self._run(input, self.weight, self.bias)

    def _run(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """The layer's computation with ``weight`` (kept block) / ``bias`` (all output channels)
        in place of the stored ones; :mod:`apb_sparse.fuse` passes BatchNorm-folded ones."""
        x, unbatched = _conv.batched(input, "ChannelSparseConv2d")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"ChannelSparseConv2d: input has {x.shape[1]} channels, expected {self.in_channels}")
        x = self._plan.apply(x)
        padding = self._plan.kernel
        if self.in_index.numel() == 0 or self.out_index.numel() == 0:
            n, _, oh, ow = ops.conv_output_size(x.shape, self.weight_shape, self.stride, padding, self.dilation)
            y = x.new_zeros((n, self.out_index.numel(), oh, ow))
            # Keep the output in the input's autograd graph (zero gradient): attacks and
            # gradient-based evaluations need d(output)/d(input) even through a fully pruned layer.
            # An empty slice's sum is exactly 0, even for non-finite inputs.
            y = y + x.reshape(-1)[:0].sum()
        else:
            if self.in_index.numel() < self.in_channels:
                x = x.index_select(1, self.in_index)
            y = F.conv2d(x, weight, None, self.stride, padding, self.dilation)
        if self.out_index.numel() < self.out_channels:
            out = y.new_zeros((y.shape[0], self.out_channels, y.shape[2], y.shape[3]))
            y = out.index_copy(1, self.out_index, y)
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, kept_out={self.out_index.numel()}, kept_in={self.in_index.numel()}")
