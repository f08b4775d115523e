"""A/B: sparsify(m) (fuse="auto", the default) vs sparsify(m, fuse=True) vs fuse=False, and the
per-call cost of one small sparse op with and without its Python autograd kernel (call_op).

ResNet-18 (CIFAR geometry), per-layer magnitude masks, 2 threads, interleaved calls, medians.
Run: python benchmarks/experiments/fuse_default_ab.py
"""
import time
import timeit

import torch
from torch import nn

from apb_sparse import apply_masks, magnitude_masks, ops, sparsify
from apb_sparse.models import get_model
from apb_sparse.nn import SparseConv2d

torch.manual_seed(0)
torch.set_num_threads(2)
dense = get_model("resnet18").eval()
for sp, bs, calls in ((0.99, 1, 3000), (0.9, 1, 600), (0.99, 32, 150), (0.9, 32, 60)):
    masked = apply_masks(dense, magnitude_masks(dense, sp))
    variants = {"default": sparsify(masked), "fuse=True": sparsify(masked, fuse=True),
                "fuse=False": sparsify(masked, fuse=False)}
    x = torch.rand(bs, 3, 32, 32)
    times = {k: [] for k in variants}
    with torch.no_grad():
        for m in variants.values():
            m(x)
        for i in range(calls):
            k = list(variants)[i % len(variants)]
            t = time.perf_counter()
            variants[k](x)
            times[k].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    print(f"resnet18 {sp:.0%} b={bs}: " + "  ".join(f"{k} {v:.3f} ms" for k, v in med.items()), flush=True)

conv = SparseConv2d.from_dense(nn.Conv2d(64, 64, 3, padding=1, bias=False), (torch.rand(64, 64, 3, 3) > 0.99).float())
x = torch.rand(1, 64, 4, 4)
op = torch.ops.apb_sparse.sparse_conv2d
args = (x, conv.values, conv.row_ptr, conv.col_idx, [64, 64, 3, 3], None, [1, 1], [1, 1], [1, 1], 1, None, False)
with torch.no_grad():
    for _ in range(2):  # interleaved pairs of repeats
        direct = min(timeit.repeat(lambda: op(*args), number=20000, repeat=3)) / 20000
        below = min(timeit.repeat(lambda: ops.call_op(op, *args), number=20000, repeat=3)) / 20000
        print(f"64->64 3x3 99 % on 4x4, no_grad: op through its autograd kernel {direct * 1e6:.1f} us, "
              f"ops.call_op {below * 1e6:.1f} us")
