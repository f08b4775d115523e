"""Typed Python wrappers over ``torch.ops.apb_sparse.*``, with fake (meta) and autograd registrations.

Sparse weights use CSR over output channels (output features for linear layers):

* ``row_ptr``: int32 ``[out + 1]``
* ``col_idx``: int32 ``[nnz]``; for convolutions the tap index ``(c * kH + kh) * kW + kw`` inside
  the output channel's group, for linear layers the input feature.
* ``values``: ``[nnz]``, the input's dtype.

:func:`pack_csr` builds these from a dense (masked) weight.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .csr import check_csr, pack_csr, unpack_csr  # the CSR format of every op, re-exported

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)
    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # pragma: no cover - only without a build
    _C = None
    _IMPORT_ERROR = exc

__all__ = [
    "available", "pack_csr", "unpack_csr", "masked_conv2d", "sparse_conv2d", "sparse_linear", "max_pool2x2",
    "conv_output_size", "use_portable_kernel", "use_row_tiles", "use_lanes", "check_csr",
    "kernel_options", "kernel_config", "supported_isas",
]

IntPair = Union[int, Sequence[int]]


def available() -> bool:
    """True when the compiled extension ``apb_sparse._C`` is loaded."""
    return _C is not None


def _require() -> None:
    if _C is None:
        raise RuntimeError(
            "apb_sparse._C is not built: install torch first, then `pip install --no-build-isolation -e .` "
            f"(import error: {_IMPORT_ERROR})")


def kernel_options() -> Dict[str, Union[str, bool, int]]:
    """The CPU kernel's run-time options and their current values.

    ``isa`` (``"generic"``, ``"avx2"``, ``"avx512"``: the instruction set in use, capped by
    :func:`kernel_config`), ``row_tiles``, ``channel_blocking``, ``lanes``, ``lanes_tiles``,
    ``lanes_blocks_inner`` (layouts and loop orders of the forward convolution, see docs/ops.md),
    ``shifted_layout`` (0 off, 1 auto, 2 wherever possible) and
    ``min_parallel_work`` (smallest op call split across threads).  Every option only changes speed,
    never results: tests and benchmarks switch them to compare the paths.
    """
    _require()
    return {name: _C._kernel_option(name) for name in _C._kernel_option()}


def supported_isas() -> List[str]:
    """Instruction sets of the CPU kernel this machine can run, lowest first."""
    _require()
    return list(_C._supported_isas())


@contextlib.contextmanager
def kernel_config(**options: Union[str, bool, int]) -> Iterator[Dict[str, Union[str, bool, int]]]:
    """Context manager that sets CPU kernel options (see :func:`kernel_options`) and restores them.

    ``with kernel_config(isa="generic", lanes=False): ...``.  An unknown option name is refused
    before anything changes; a bad value (wrong type, out of range, an ISA this CPU lacks) is an
    error naming the option, after which the options already set are restored.  The options are
    process-wide (not per thread).  Yields the previous values of the options set.
    """
    _require()
    known = _C._kernel_option()
    for name in options:
        if name not in known:
            raise ValueError(f"unknown kernel option {name!r} (options: {', '.join(known)})")
    previous: Dict[str, Union[str, bool, int]] = {}
    try:
        for name, value in options.items():
            previous[name] = _C._kernel_option(name, value)
        yield dict(previous)
    finally:
        for name, value in reversed(list(previous.items())):
            _C._kernel_option(name, value)


def use_portable_kernel(enable: bool) -> bool:
    """Force (``True``) or release the portable (non-SIMD) CPU kernel. Returns the previous setting.

    Prefer ``kernel_config(isa="generic")``, which restores the previous ISA cap on exit.
    """
    _require()
    previous = _C._kernel_option("isa", "generic" if enable else supported_isas()[-1])
    return previous == "generic"


def use_row_tiles(enable: bool) -> bool:
    """Enable (default) or disable the specialised layouts of the CPU forward convolution:
    output-row tiles (when the output width divides the register tile: whole output rows per tile,
    stored straight from registers) and the tap-major layout for outputs narrower than a vector
    (4x4 maps in float32). Disabled, every convolution uses the strip layout over the padded grid.
    Returns the previous setting; ``kernel_config(row_tiles=...)`` restores it on exit.
    """
    _require()
    return bool(_C._kernel_option("row_tiles", bool(enable)))


def use_lanes(enable: bool) -> bool:
    """Enable (default) or disable the images-in-lanes layout of the CPU forward convolution: for
    batches of at least one vector of images (8 in float32 with AVX2 units) on output maps of at
    most 64 pixels, the vector lanes hold images instead of pixels, so 4x4 and 2x2 maps waste no
    lanes and need no im2col. Disabled, those convolutions use the layouts of
    :func:`use_row_tiles`. Returns the previous setting; ``kernel_config(lanes=...)`` restores it.
    """
    _require()
    return bool(_C._kernel_option("lanes", bool(enable)))


def _pair(name: str, value: IntPair, minimum: int) -> List[int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    try:
        out = [int(v) for v in value]
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(out) != 2:
        raise ValueError(f"{name} must have 2 entries, got {value!r}")
    if any(v < minimum for v in out):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


# dtypes the kernels compute in; float16 / bfloat16 inputs are computed in float32 (upcast,
# compute, cast back: float32 accumulation, like the vendor kernels' half-precision paths).
KERNEL_DTYPES = (torch.float32, torch.float64)
UPCAST_DTYPES = (torch.float16, torch.bfloat16)


def _check_input(name: str, x: Tensor, dim: Optional[int] = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(x.shape)}")
    if x.dtype not in KERNEL_DTYPES + UPCAST_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")


def _upcast(input: Tensor, **tensors: Optional[Tensor]):
    """float32 copies of the floating tensors when ``input`` is float16 / bfloat16 (else as given).

    Half-precision tensors must all share the input's dtype, as the kernels require of float32 ones.
    """
    # bfloat16 on CUDA is computed natively by the CUDA kernels (float accumulation).
    if input.dtype not in UPCAST_DTYPES or (input.dtype == torch.bfloat16 and input.is_cuda):
        return input, tensors
    out = {}
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.is_floating_point():
            if t.dtype != input.dtype:
                raise TypeError(f"{name} dtype {t.dtype} does not match the input dtype {input.dtype}")
            t = t.float()
        out[name] = t
    return input.float(), out


def _same_device(input: Tensor, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device}, expected the input's device {input.device}")


def conv_output_size(input_size: Sequence[int], weight_size: Sequence[int], stride: IntPair = 1,
                     padding: IntPair = 0, dilation: IntPair = 1) -> Tuple[int, int, int, int]:
    """Output shape ``(N, O, OH, OW)`` of a convolution."""
    s, p, d = _pair("stride", stride, 1), _pair("padding", padding, 0), _pair("dilation", dilation, 1)
    n, _, h, w = input_size
    o, _, kh, kw = weight_size
    oh = (h + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    ow = (w + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    return int(n), int(o), int(oh), int(ow)


def _csr_rows(row_ptr: Tensor, nnz: int) -> Tensor:
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    # output_size from metadata: without it repeat_interleave reads the total back to the host (a
    # device sync, which also breaks CUDA-graph capture).
    return torch.repeat_interleave(torch.arange(counts.numel(), device=row_ptr.device), counts, output_size=nnz)


# Elements per temporary of the sampled product below (64 MB in float32).
_SAMPLED_CHUNK_ELEMENTS = 1 << 24


def _sampled_product(g2: Tensor, x2: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``out[j] = sum_b g2[b, rows[j]] * x2[b, cols[j]]``: the entries of ``g2.T @ x2`` at the
    nonzeros only, in chunks of nonzeros so that the ``batch x chunk`` temporaries stay below
    ``_SAMPLED_CHUNK_ELEMENTS`` whatever the batch and nnz (one shot would need two ``batch x nnz``
    tensors: 3 GB each at batch 512 and 1.6 M nonzeros).  Low-precision inputs accumulate in
    float32."""
    acc = torch.float32 if g2.dtype in (torch.float16, torch.bfloat16) else g2.dtype
    nnz = rows.numel()
    step = max(1, _SAMPLED_CHUNK_ELEMENTS // max(1, g2.shape[0]))
    parts = [(g2[:, rows[s:s + step]].to(acc) * x2[:, cols[s:s + step]].to(acc)).sum(0).to(g2.dtype)
             for s in range(0, nnz, step)]
    if not parts:
        return g2.new_zeros(0)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


# ----------------------------------------------------------------------------------------------
# masked_conv2d


def masked_conv2d(input: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None,
                  stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
                  groups: int = 1) -> Tensor:
    """Convolution with ``weight * mask`` that skips the masked-out (and zero) weights.

    Differentiable with respect to ``input``, ``weight``, ``mask`` and ``bias``.  The weight and
    mask gradients are dense (every position), so methods can learn scores through the mask.

    Args:
        input: ``(N, C, H, W)`` float32/float64 (float16/bfloat16 are computed in float32), any
            strides (channels_last included).
        weight: ``(O, C / groups, kH, kW)``.
        mask: same shape as ``weight`` (0/1 values; any real values are multiplied in).
            Only the nonzeros of ``weight * mask`` are computed: a non-finite input value reaches
            only the outputs whose kept taps read it (``F.conv2d`` would also spread it through
            the zero weights, since ``0 * nan = nan``).
        bias: optional ``(O,)``.
        stride, padding, dilation: int or pair; groups: int.

    Returns:
        ``(N, O, OH, OW)`` contiguous tensor, equal to
        ``F.conv2d(input, weight * mask, bias, stride, padding, dilation, groups)``.
    """
    _require()
    _check_input("input", input, 4)
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    _same_device(input, weight=weight, mask=mask, bias=bias)
    dtype = input.dtype
    input, t = _upcast(input, weight=weight, mask=mask, bias=bias)
    out = call_op(
        torch.ops.apb_sparse.masked_conv2d, input, t["weight"], t["mask"], t["bias"], _pair("stride", stride, 1), _pair("padding", padding, 0),
        _pair("dilation", dilation, 1), groups)
    return out.to(dtype)


_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowAutograd


def call_op(op, *args):
    """``op(*args)``; with grad mode off (``torch.no_grad()`` / ``inference_mode``, the deployment
    case) the op's Python autograd kernel is skipped: it would only pass the call on, and costs
    about 8 us per call, a quarter of a 99 %-sparse layer at batch 1.  Not while torch.compile
    traces (it keeps the op in its graph either way)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args)
    with _BELOW_AUTOGRAD():
        return op(*args)


def sparse_conv2d(input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor,
                  weight_size: Sequence[int], bias: Optional[Tensor] = None, stride: IntPair = 1,
                  padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
                  residual: Optional[Tensor] = None, relu: bool = False, max_pool: bool = False) -> Tensor:
    """Convolution with a CSR-packed weight (see :func:`pack_csr`), optionally fused with a
    residual add, a ReLU and a 2x2 max pool: ``max_pool2d(relu(conv(input) + bias + residual), 2, 2)``.

    Differentiable with respect to ``input`` (white-box attacks on deployed models), ``values``,
    ``bias`` and ``residual``, except with ``max_pool=True`` (inference only: for gradients call
    it without, then ``F.max_pool2d``).

    Args:
        input: ``(N, C, H, W)``, any strides.
        values, row_ptr, col_idx: the CSR weight.
        weight_size: the dense weight shape ``(O, C / groups, kH, kW)``.
        residual: optional tensor of the output's shape added before the activation.
        relu: apply ReLU to the result.
        max_pool: then ``nn.MaxPool2d(2, 2)`` (floor mode: an odd last row or column is dropped;
            NaN propagates).  On the CPU the images-in-lanes layout pools in its store pass, so
            the unpooled output is never written; other layouts run :func:`max_pool2x2` after.

    Returns:
        ``(N, O, OH, OW)`` contiguous tensor (``(N, O, OH // 2, OW // 2)`` with ``max_pool``).

    Raises:
        RuntimeError: ``max_pool=True`` while autograd records (an input requires gradients).
    """
    _require()
    _check_input("input", input, 4)
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if len(weight_size) != 4:
        raise ValueError(f"weight_size must have 4 entries, got {weight_size!r}")
    _same_device(input, values=values, row_ptr=row_ptr, col_idx=col_idx, bias=bias, residual=residual)
    dtype = input.dtype
    input, t = _upcast(input, values=values, bias=bias, residual=residual)
    out = call_op(
        torch.ops.apb_sparse.sparse_conv2d, input, t["values"], row_ptr, col_idx, [int(s) for s in weight_size], t["bias"],
        _pair("stride", stride, 1), _pair("padding", padding, 0), _pair("dilation", dilation, 1), groups,
        t["residual"], bool(relu), bool(max_pool))
    return out.to(dtype)


def sparse_linear(input: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, in_features: int,
                  bias: Optional[Tensor] = None) -> Tensor:
    """Linear layer ``input @ W.T + bias`` with a CSR-packed ``W`` of shape ``(out, in_features)``.

    Args:
        input: ``(*, in_features)``.

    Returns:
        ``(*, out)`` where ``out = row_ptr.numel() - 1``.
    """
    _require()
    _check_input("input", input)
    _same_device(input, values=values, row_ptr=row_ptr, col_idx=col_idx, bias=bias)
    dtype = input.dtype
    input, t = _upcast(input, values=values, bias=bias)
    out = call_op(torch.ops.apb_sparse.sparse_linear, input, t["values"], row_ptr, col_idx, int(in_features),
                  t["bias"])
    return out.to(dtype)


def max_pool2x2(input: Tensor) -> Tensor:
    """``nn.MaxPool2d(2, 2)``'s values (floor mode: an odd last row or column is dropped; NaN
    propagates) in one pass, for inference: no autograd (use ``F.max_pool2d`` for gradients).

    Args:
        input: ``(N, C, H, W)`` or ``(C, H, W)``, float32 or float64, on the CPU.

    Returns:
        ``(..., H // 2, W // 2)``.
    """
    _require()
    _check_input("input", input)
    if input.device.type != "cpu":
        raise ValueError(f"input must be on the CPU (max_pool2x2 has no CUDA kernel), got {input.device}")
    return torch.ops.apb_sparse.max_pool2x2(input)


if _C is not None:

    def _conv_out(input, weight_size, stride, padding, dilation):
        n, o, oh, ow = conv_output_size(input.shape, weight_size, stride, padding, dilation)
        return input.new_empty((n, o, oh, ow))

    @torch.library.register_fake("apb_sparse::masked_conv2d")
    def _(input, weight, mask, bias, stride, padding, dilation, groups):
        return _conv_out(input, weight.shape, stride, padding, dilation)

    @torch.library.register_fake("apb_sparse::masked_conv2d_backward_input")
    def _(grad_output, weight, mask, input_size, stride, padding, dilation, groups):
        return grad_output.new_empty(tuple(input_size))

    @torch.library.register_fake("apb_sparse::sparse_conv2d")
    def _(input, values, row_ptr, col_idx, weight_size, bias, stride, padding, dilation, groups, residual=None,
          relu=False, max_pool=False):
        out = _conv_out(input, weight_size, stride, padding, dilation)
        return out.new_empty((*out.shape[:2], out.shape[2] // 2, out.shape[3] // 2)) if max_pool else out

    @torch.library.register_fake("apb_sparse::sparse_conv2d_pair")
    def _(input, values1, row_ptr1, col_idx1, weight_size1, bias1, stride1, padding1, dilation1, groups1, relu1,
          values2, row_ptr2, col_idx2, weight_size2, bias2, stride2, padding2, dilation2, groups2, residual=None,
          relu=False, max_pool=False, shortcut_values=None, shortcut_row_ptr=None, shortcut_col_idx=None,
          shortcut_bias=None):
        mid = _conv_out(input, weight_size1, stride1, padding1, dilation1)
        out = _conv_out(mid, weight_size2, stride2, padding2, dilation2)
        return out.new_empty((*out.shape[:2], out.shape[2] // 2, out.shape[3] // 2)) if max_pool else out

    @torch.library.register_fake("apb_sparse::sparse_conv2d_backward_input")
    def _(grad_output, values, row_ptr, col_idx, weight_size, input_size, stride, padding, dilation, groups):
        return grad_output.new_empty(tuple(input_size))

    @torch.library.register_fake("apb_sparse::sparse_linear")
    def _(input, values, row_ptr, col_idx, in_features, bias):
        return input.new_empty((*input.shape[:-1], row_ptr.shape[0] - 1))

    @torch.library.register_fake("apb_sparse::sparse_linear_backward_input")
    def _(grad_output, values, row_ptr, col_idx, in_features):
        return grad_output.new_empty((*grad_output.shape[:-1], in_features))

    @torch.library.register_fake("apb_sparse::max_pool2x2")
    def _(input):
        return input.new_empty((*input.shape[:-2], input.shape[-2] // 2, input.shape[-1] // 2))

    # -- autograd ------------------------------------------------------------------------------

    def _masked_conv2d_setup(ctx, inputs, output):
        input, weight, mask, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(input, weight, mask)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None

    def _masked_conv2d_backward(ctx, grad):
        input, weight, mask = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_m, need_b = ctx.needs_input_grad[:4]
        # create_graph=True (double backward: gradient penalties, Hessian-vector products): the
        # registered backward ops have no derivatives of their own, so build the input gradient
        # from differentiable dense ops.  Otherwise the sparse kernel.
        double = torch.is_grad_enabled()
        gx = gw = gm = gb = None
        if need_x:
            if double:
                gx = torch.nn.grad.conv2d_input(input.shape, weight * mask, grad, stride, padding, dilation, groups)
            else:
                gx = torch.ops.apb_sparse.masked_conv2d_backward_input(
                    grad, weight, mask, list(input.shape), stride, padding, dilation, groups)
        if (need_w or need_m) and weight.numel() == 0:
            gw = torch.zeros_like(weight) if need_w else None
            gm = torch.zeros_like(mask) if need_m else None
        elif need_w or need_m:
            # Gradient of the effective weight at every position (dense by nature: score-based
            # methods need it where the mask is 0 too).
            geff = torch.nn.grad.conv2d_weight(input, weight.shape, grad, stride, padding, dilation, groups)
            gw = geff * mask if need_w else None
            gm = geff * weight if need_m else None
        if need_b and ctx.has_bias:
            gb = grad.sum((0, 2, 3))
        return gx, gw, gm, gb, None, None, None, None

    torch.library.register_autograd("apb_sparse::masked_conv2d", _masked_conv2d_backward,
                                    setup_context=_masked_conv2d_setup)

    def _pair_setup(ctx, inputs, output):
        raise RuntimeError("sparse_conv2d_pair has no backward (inference only: deployed models call it only "
                           "where no gradient is recorded); for gradients call sparse_conv2d twice")

    def _pair_backward(ctx, grad):  # never reached: _pair_setup raises
        raise RuntimeError("sparse_conv2d_pair has no backward")

    torch.library.register_autograd("apb_sparse::sparse_conv2d_pair", _pair_backward, setup_context=_pair_setup)

    def _sparse_conv2d_setup(ctx, inputs, output):
        input, values, row_ptr, col_idx, weight_size, bias, stride, padding, dilation, groups = inputs[:10]
        relu = inputs[11] if len(inputs) > 11 else False
        if len(inputs) > 12 and inputs[12]:
            raise RuntimeError("sparse_conv2d: max_pool=True has no backward (inference only); for gradients call "
                               "it with max_pool=False, then F.max_pool2d(out, 2, 2)")
        ctx.save_for_backward(input, values, row_ptr, col_idx, output if relu else None)
        ctx.conv = (list(weight_size), stride, padding, dilation, groups)
        ctx.has_bias = bias is not None

    def _sparse_conv2d_backward(ctx, grad):
        input, values, row_ptr, col_idx, output = ctx.saved_tensors
        weight_size, stride, padding, dilation, groups = ctx.conv
        if output is not None:  # fused ReLU (its derivative is constant almost everywhere)
            grad = grad * (output > 0).to(grad.dtype)
        double = torch.is_grad_enabled()  # create_graph=True: differentiable ops only (see masked_conv2d)
        gx = gv = gb = gr = None
        if ctx.needs_input_grad[0]:
            if double:
                weight = unpack_csr(values, row_ptr, col_idx, weight_size)
                gx = torch.nn.grad.conv2d_input(input.shape, weight, grad, stride, padding, dilation, groups)
            else:
                gx = torch.ops.apb_sparse.sparse_conv2d_backward_input(
                    grad, values, row_ptr, col_idx, weight_size, list(input.shape), stride, padding, dilation,
                    groups)
        if ctx.needs_input_grad[1] and values.numel() == 0:
            gv = torch.zeros_like(values)
        elif ctx.needs_input_grad[1]:
            geff = torch.nn.grad.conv2d_weight(input, weight_size, grad, stride, padding, dilation, groups)
            gv = geff.reshape(weight_size[0], -1)[_csr_rows(row_ptr, col_idx.numel()), col_idx.to(torch.int64)]
        if ctx.needs_input_grad[5] and ctx.has_bias:
            gb = grad.sum((0, 2, 3))
        if len(ctx.needs_input_grad) > 10 and ctx.needs_input_grad[10]:
            gr = grad
        return gx, gv, None, None, None, gb, None, None, None, None, gr, None, None

    torch.library.register_autograd("apb_sparse::sparse_conv2d", _sparse_conv2d_backward,
                                    setup_context=_sparse_conv2d_setup)

    def _sparse_linear_setup(ctx, inputs, output):
        input, values, row_ptr, col_idx, in_features, bias = inputs
        ctx.save_for_backward(input, values, row_ptr, col_idx)
        ctx.in_features = in_features
        ctx.has_bias = bias is not None

    def _sparse_linear_backward(ctx, grad):
        input, values, row_ptr, col_idx = ctx.saved_tensors
        gx = gv = gb = None
        out_features = row_ptr.shape[0] - 1
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():  # create_graph=True: differentiable ops only (see masked_conv2d)
                gx = grad @ unpack_csr(values, row_ptr, col_idx, (out_features, ctx.in_features))
            else:
                gx = torch.ops.apb_sparse.sparse_linear_backward_input(grad, values, row_ptr, col_idx,
                                                                       ctx.in_features)
        batch = math.prod(grad.shape[:-1])  # not reshape(-1, 0): ambiguous without features
        if ctx.needs_input_grad[1]:
            g2 = grad.reshape(batch, out_features)
            x2 = input.reshape(batch, ctx.in_features)
            gv = _sampled_product(g2, x2, _csr_rows(row_ptr, col_idx.numel()), col_idx.to(torch.int64))
        if ctx.needs_input_grad[5] and ctx.has_bias:
            gb = grad.reshape(batch, out_features).sum(0)
        return gx, gv, None, None, None, gb

    torch.library.register_autograd("apb_sparse::sparse_linear", _sparse_linear_backward,
                                    setup_context=_sparse_linear_setup)
