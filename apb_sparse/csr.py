"""The CSR format of sparse weights (see :mod:`apb_sparse.ops`): build it from a dense (masked)
weight (:func:`pack_csr`), expand it back (:func:`unpack_csr`) and validate untrusted arrays
(:func:`check_csr`).  Re-exported by :mod:`apb_sparse.ops`."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["pack_csr", "unpack_csr", "check_csr"]


@torch.no_grad()
def pack_csr(weight: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Pack the nonzeros of ``weight * mask`` into CSR over dim 0.

    Args:
        weight: ``(O, ...)`` dense weight (conv ``(O, C/g, kH, kW)`` or linear ``(O, I)``).
        mask: optional 0/1 tensor of the same shape.

    Returns:
        ``(values, row_ptr, col_idx)``; see the module docstring.
    """
    if mask is not None:
        if mask.shape != weight.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(weight.shape)}")
        weight = weight * mask.to(weight.dtype)
    cols = 1
    for n in weight.shape[1:]:
        cols *= int(n)
    w2 = weight.detach().reshape(weight.shape[0], cols)  # explicit: -1 is ambiguous for 0 rows
    if w2.shape[1] >= 2**31 or w2.numel() >= 2**31:
        raise ValueError("weight is too large for int32 CSR indices")
    rows, cols = torch.nonzero(w2, as_tuple=True)
    values = w2[rows, cols].contiguous()
    counts = torch.bincount(rows, minlength=w2.shape[0])
    row_ptr = torch.zeros(w2.shape[0] + 1, dtype=torch.int32, device=weight.device)
    row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return values, row_ptr, cols.to(torch.int32).contiguous()


def unpack_csr(values: Tensor, row_ptr: Tensor, col_idx: Tensor, shape: Sequence[int]) -> Tensor:
    """Dense tensor of ``shape`` from CSR (inverse of :func:`pack_csr`).

    Entries repeated within a row are summed, as the kernels do.  Differentiable in ``values``.
    """
    rows_n = int(shape[0])
    cols_n = 1
    for s in shape[1:]:
        cols_n *= int(s)
    check_csr(values, row_ptr, col_idx, (rows_n, cols_n), full=False)
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(rows_n, device=values.device), counts, output_size=values.numel())
    dense = torch.zeros(rows_n, cols_n, dtype=values.dtype, device=values.device)
    dense = dense.index_put((rows, col_idx.to(torch.int64)), values, accumulate=True)
    return dense.reshape(tuple(int(s) for s in shape))


def check_csr(values: Tensor, row_ptr: Tensor, col_idx: Tensor, shape: Sequence[int], *,
              names: Sequence[str] = ("values", "row_ptr", "col_idx"), full: bool = True) -> None:
    """Raise ``ValueError`` (naming the tensor) unless the CSR arrays describe a ``shape[0] x
    prod(shape[1:])`` matrix: 1-D tensors, int32 indices, ``row_ptr`` of ``rows + 1`` entries
    from 0 to ``nnz`` and non-decreasing, every ``col_idx`` in range and, when ``full``, no column
    repeated within a row.

    Layers run it when a state dict is loaded, so that a corrupted or tampered checkpoint is
    refused with a message instead of changing the layer's shape or results.
    """
    nv, nr, nc = names
    rows_n = int(shape[0])
    cols_n = 1
    for s in shape[1:]:
        cols_n *= int(s)
    for name, t in zip(names, (values, row_ptr, col_idx)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if not values.is_floating_point():
        raise ValueError(f"{nv} must be floating point, got {values.dtype}")
    for name, t in ((nr, row_ptr), (nc, col_idx)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if rows_n < 0 or cols_n < 0:
        raise ValueError(f"shape must be non-negative, got {tuple(int(s) for s in shape)}")
    if row_ptr.numel() != rows_n + 1:
        raise ValueError(f"{nr} has {row_ptr.numel()} entries, expected {rows_n + 1} (rows + 1) for a weight of "
                         f"shape {tuple(int(s) for s in shape)}")
    if col_idx.numel() != values.numel():
        raise ValueError(f"{nc} has {col_idx.numel()} entries but {nv} has {values.numel()}")
    rp = row_ptr.to(torch.int64)
    if int(rp[0]) != 0 or int(rp[-1]) != values.numel():
        raise ValueError(f"{nr} must start at 0 and end at nnz = {values.numel()}, got {int(rp[0])} ... "
                         f"{int(rp[-1])}")
    if rows_n and bool((rp[1:] < rp[:-1]).any()):
        raise ValueError(f"{nr} must be non-decreasing")
    if values.numel() == 0:
        return
    ci = col_idx.to(torch.int64)
    bad = (ci < 0) | (ci >= cols_n)
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise ValueError(f"{nc} entry {int(ci[j])} at position {j} is out of range [0, {cols_n})")
    if full:
        rows = torch.repeat_interleave(torch.arange(rows_n, device=ci.device), rp[1:] - rp[:-1],
                                       output_size=values.numel())
        keys = rows * cols_n + ci
        if torch.unique(keys).numel() != keys.numel():
            raise ValueError(f"{nc} repeats a column within a row (each weight must be stored once)")
