"""torch.compile of the fused sparse ResNet-18 at 99 %, batch 1, against eager (2 threads).

One-off experiment of the kernel-v3 round, kept so the numbers in README / the closing note can be
reproduced; not part of the test or benchmark suites."""
import torch, time
from apb_sparse import sparsify, magnitude_masks, apply_masks
from apb_sparse.models import get_model
from apb_sparse.bench import interleaved_medians
torch.set_num_threads(2); torch.set_flush_denormal(True)
torch.manual_seed(0)
m = get_model("resnet18").eval()
s = sparsify(apply_masks(m, magnitude_masks(m, 0.99)), fuse=True).eval()
dense = m
x = torch.rand(1, 3, 32, 32)
t0 = time.perf_counter()
c = torch.compile(s, dynamic=False)
with torch.inference_mode():
    y = c(x)
print("compile s", time.perf_counter() - t0, "max diff", float((y - s(x)).abs().max()))
r = interleaved_medians({"dense": lambda: dense(x), "eager sparse": lambda: s(x), "compiled sparse": lambda: c(x)}, rounds=7, warmup=2, min_time=0.1)
d = r["dense"]["median_s"]
for k, v in r.items(): print(f"{k:18s} {v['median_s']*1e3:.3f} ms {d/v['median_s']:.2f}x")
