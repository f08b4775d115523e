#!/usr/bin/env python
"""Every apb_sparse CUDA op, forward and backward, on small inputs: the workload for
compute-sanitizer (memcheck, racecheck, initcheck, synccheck).

    compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/cuda_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python3 benchmarks/cuda_sanitize.py --quick

Shapes are small (the sanitizer slows kernels down 10-100x) but cover each kernel template and
branch: float32, float64 and bfloat16; both conv forward tilings (4 and 1 positions per thread);
unit and non-unit stride in the backward gather; groups, dilation, padding; the fused residual +
ReLU epilogue; rows longer than one shared-memory chunk; empty rows, an all-zero weight, batch 0;
the CSR validation kernel (valid and malformed CSR); the CSR-to-CSC sort of both backward ops;
and, under CUDA-graph capture (where validation is skipped), malformed CSR through the clamped
kernels.  Each result is checked against the CPU op, so the run also fails on wrong results.
Exits 0 when everything ran and matched.
"""
from __future__ import annotations

import argparse
import sys

import torch

from apb_sparse import ops

A = None  # torch.ops.apb_sparse, once the extension is loaded
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _close(got, ref, what):
    ref = ref.double()
    err = float((got.detach().double().cpu() - ref).abs().max()) if ref.numel() else 0.0
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    tol = TOL[got.dtype]
    if not err <= tol * scale:
        raise AssertionError(f"{what}: max error {err:.3g} > {tol * scale:.3g}")


def conv_case(dtype, n, c, o, hw, k, stride, padding, dilation, groups, density, residual=False, relu=False):
    """Forward and backward of the conv ops (direct and through autograd), checked against the CPU ops."""
    g = torch.Generator().manual_seed(n * 1000 + c * 100 + o)
    cpu_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    x = torch.randn(n, c, hw, hw, generator=g).to(dtype)
    w = (torch.randn(o, c // groups, k, k, generator=g) * (torch.rand(o, c // groups, k, k, generator=g) < density))
    w = w.to(dtype)
    m = (w != 0).to(dtype)
    b = torch.randn(o, generator=g).to(dtype)
    args = ([stride, stride], [padding, padding], [dilation, dilation], groups)
    xc, wc, mc, bc = x.cuda(), w.cuda(), m.cuda(), b.cuda()
    xf, wf, mf, bf = (t.to(cpu_dtype) for t in (x, w, m, b))
    ref = A.masked_conv2d(xf, wf, mf, bf, *args)
    _close(A.masked_conv2d(xc, wc, mc, bc, *args), ref, f"masked_conv2d {dtype}")
    v, rp, ci = ops.pack_csr(wc, mc)
    res = torch.randn(ref.shape, generator=g).to(dtype) if residual else None
    ref_s = A.sparse_conv2d(xf, v.cpu().to(cpu_dtype), rp.cpu(), ci.cpu(), list(w.shape), bf, *args,
                            res.to(cpu_dtype) if res is not None else None, relu)
    got_s = A.sparse_conv2d(xc, v, rp, ci, list(w.shape), bc, *args, res.cuda() if res is not None else None, relu)
    _close(got_s, ref_s, f"sparse_conv2d {dtype} residual={residual} relu={relu}")
    go = torch.randn(ref.shape, generator=g).to(dtype)
    ref_gi = A.masked_conv2d_backward_input(go.to(cpu_dtype), wf, mf, list(x.shape), *args)
    _close(A.masked_conv2d_backward_input(go.cuda(), wc, mc, list(x.shape), *args), ref_gi,
           f"masked_conv2d_backward_input {dtype}")
    _close(A.sparse_conv2d_backward_input(go.cuda(), v, rp, ci, list(w.shape), list(x.shape), *args), ref_gi,
           f"sparse_conv2d_backward_input {dtype}")
    # Autograd through the wrappers: every gradient (weight / mask / values via cuDNN and gathers).
    xa, wa, ma = (t.clone().requires_grad_() for t in (xc, wc, mc))
    ops.masked_conv2d(xa, wa, ma, bc, *args).float().square().sum().backward()
    va = v.clone().requires_grad_()
    xs = xc.clone().requires_grad_()
    ops.sparse_conv2d(xs, va, rp, ci, w.shape, bc, *args, residual=res.cuda() if res is not None else None,
                      relu=relu).float().sum().backward()
    torch.cuda.synchronize()


def linear_case(dtype, batch, i, o, density):
    g = torch.Generator().manual_seed(batch * 7 + i)
    cpu_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    w = (torch.randn(o, i, generator=g) * (torch.rand(o, i, generator=g) < density)).to(dtype)
    x = torch.randn(batch, i, generator=g).to(dtype)
    b = torch.randn(o, generator=g).to(dtype)
    v, rp, ci = ops.pack_csr(w.cuda())
    vf = v.cpu().to(cpu_dtype)
    ref = A.sparse_linear(x.to(cpu_dtype), vf, rp.cpu(), ci.cpu(), i, b.to(cpu_dtype))
    _close(A.sparse_linear(x.cuda(), v, rp, ci, i, b.cuda()), ref, f"sparse_linear {dtype}")
    go = torch.randn(batch, o, generator=g).to(dtype)
    ref_gi = A.sparse_linear_backward_input(go.to(cpu_dtype), vf, rp.cpu(), ci.cpu(), i)
    _close(A.sparse_linear_backward_input(go.cuda(), v, rp, ci, i), ref_gi, f"sparse_linear_backward_input {dtype}")
    xa, va = x.cuda().requires_grad_(), v.clone().requires_grad_()
    ops.sparse_linear(xa, va, rp, ci, i, b.cuda()).float().square().sum().backward()
    torch.cuda.synchronize()


def malformed_cases():
    """Malformed CSR: refused outside capture (validation kernel), clamped inside a CUDA graph."""
    x = torch.randn(2, 4, 6, 6, device="cuda")
    w = torch.randn(6, 4, 3, 3, device="cuda")
    v, rp, ci = ops.pack_csr(w)
    bad_ci = ci.clone()
    bad_ci[::7] = 10_000
    bad_ci[1] = -5
    bad_rp = rp.clone()
    bad_rp[2] = -100
    bad_rp[3] = 1_000_000
    args = ([1, 1], [1, 1], [1, 1], 1)
    y = torch.randn(2, 6, 6, 6, device="cuda")
    xl, yl = torch.randn(3, 36, device="cuda"), torch.randn(3, 6, device="cuda")
    for r, c in ((rp, bad_ci), (bad_rp, ci), (bad_rp, bad_ci)):
        try:
            A.sparse_conv2d(x, v, r, c, list(w.shape), None, *args)
        except RuntimeError:
            pass
        else:
            raise AssertionError("a malformed CSR was accepted outside graph capture")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            A.sparse_conv2d(x, v, rp, ci, list(w.shape), None, *args)  # warm-up
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            A.sparse_conv2d(x, v, r, c, list(w.shape), None, *args)
            A.sparse_conv2d_backward_input(y, v, r, c, list(w.shape), list(x.shape), *args)
            A.sparse_linear(xl, v, r, c, 36, None)
            A.sparse_linear_backward_input(yl, v, r, c, 36)
        graph.replay()
        torch.cuda.synchronize()


def main(argv=None) -> int:
    global A
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer cases (for the slower racecheck)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or not ops.available() or getattr(ops._C, "cuda_built", 0) != 1:
        print("cuda_sanitize: error: needs a CUDA GPU and an apb_sparse build with CUDA kernels", file=sys.stderr)
        return 2
    A = torch.ops.apb_sparse
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dtypes = [torch.float32, torch.bfloat16] if args.quick else [torch.float32, torch.float64, torch.bfloat16]
    for dtype in dtypes:
        # 4-positions-per-thread tiling (N*OH*OW >= 512), unit stride, fused epilogue
        conv_case(dtype, 2, 8, 16, 16, 3, 1, 1, 1, 1, 0.3, residual=True, relu=True)
        # 1-position tiling, stride 2 (non-unit-stride gather), groups, dilation
        conv_case(dtype, 1, 6, 9, 7, 3, 2, 2, 2, 3, 0.5, relu=True)
        if not args.quick:
            conv_case(dtype, 1, 300, 4, 4, 3, 1, 1, 1, 1, 1.0)  # 2700 nonzeros per row: many chunks
            conv_case(dtype, 0, 4, 6, 5, 3, 1, 1, 1, 1, 0.5)  # batch 0
            conv_case(dtype, 2, 4, 6, 5, 3, 1, 1, 1, 1, 0.0)  # all-zero weight (empty rows)
            conv_case(dtype, 2, 4, 4, 5, 1, 1, 0, 1, 4, 0.7)  # depthwise 1x1
        linear_case(dtype, 9, 70, 33, 0.2)
        if not args.quick:
            linear_case(dtype, 1, 5, 3, 0.0)
    malformed_cases()
    torch.cuda.synchronize()
    print("cuda_sanitize: every CUDA op ran forward and backward and matched the CPU ops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
