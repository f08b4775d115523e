"""Whole ResNet-18, global masks, batch 32: prototype blocking on/off. Needs out_blocking_prototype.diff applied and rebuilt.

One-off experiment of the kernel-v3 round, kept so the numbers in README / the closing note can be
reproduced; not part of the test or benchmark suites."""
import torch, sys
from apb_sparse import sparsify, magnitude_masks, apply_masks, _C
from apb_sparse.models import get_model
from apb_sparse.bench import interleaved_medians
torch.set_num_threads(2); torch.set_flush_denormal(True)
torch.manual_seed(0)
m = get_model("resnet18").eval()
x = torch.rand(32, 3, 32, 32)
dense = sparsify(m, path="dense", fuse=True).eval()
fns = {"dense": lambda: dense(x)}
for sp in (0.9, 0.95):
    mm = apply_masks(m, magnitude_masks(m, sp, scope="global"))
    auto = sparsify(mm, fuse=True).eval()
    cal = sparsify(mm, fuse=True, calibrate=x).eval()
    print(sp, "calibrated paths:", [c.path[0] for c in cal.apb_sparse_choices.values()])
    def mk(mod, mode):
        def f():
            p = _C._set_out_blocking(mode)
            try: mod(x)
            finally: _C._set_out_blocking(p)
        return f
    fns[f"g{sp} auto"] = lambda a=auto: a(x)
    fns[f"g{sp} calibrated"] = mk(cal, 1)
    fns[f"g{sp} calibrated, blocking off"] = mk(cal, 0)
r = interleaved_medians(fns, rounds=7, warmup=1, min_time=0.2)
d = r["dense"]["median_s"]
for k, v in r.items(): print(f"{k:32s} {v['median_s']*1e3:8.2f} ms  {d/v['median_s']:.2f}x")
