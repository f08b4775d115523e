"""Thread-threshold sweep: python thr.py ARCH BATCH THRESHOLD... (apb_sparse._C._set_min_parallel_work).

One-off experiment of the kernel-v3 round, kept so the numbers in README / the closing note can be
reproduced; not part of the test or benchmark suites."""
import torch, time, statistics, sys
from apb_sparse import sparsify, magnitude_masks, apply_masks
from apb_sparse.models import get_model
from apb_sparse import _C
from apb_sparse.bench import interleaved_medians
torch.set_num_threads(2); torch.set_flush_denormal(True)
arch = sys.argv[1]; batch = int(sys.argv[2])
torch.manual_seed(0)
m = get_model(arch).eval()
x = torch.rand(batch, 3, 32, 32)
models = {"dense": sparsify(m, path="dense", fuse=True).eval()}
for sp in (0.9, 0.99):
    for scope in ("local", "global"):
        models[f"{scope}{int(sp*100)}"] = sparsify(apply_masks(m, magnitude_masks(m, sp, scope=scope)), fuse=True).eval()
def with_thr(mod, thr):
    def f():
        prev = _C._set_min_parallel_work(thr)
        try: mod(x)
        finally: _C._set_min_parallel_work(prev)
    return f
fns = {"dense": lambda: models["dense"](x)}
thrs = [int(t) for t in sys.argv[3:]]
for k in models:
    if k == "dense": continue
    for t in thrs:
        fns[f"{k}@{t}"] = with_thr(models[k], t)
r = interleaved_medians(fns, rounds=7, warmup=1, min_time=0.05)
d = r["dense"]["median_s"]
print(arch, batch, f"dense {d*1e3:.2f} ms")
for k in models:
    if k == "dense": continue
    print("  ", k, "  ".join(f"thr {t:>9}: {d/r[f'{k}@{t}']['median_s']:.2f}x" for t in thrs))
