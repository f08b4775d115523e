"""Sparse vs dense stem on the checkpoints of an `apb run --out /tmp/apbrun_final` (edit the paths for another folder).

One-off experiment of the kernel-v3 round, kept so the numbers in README / the closing note can be
reproduced; not part of the test or benchmark suites."""
import torch, json, glob
from apb_sparse import sparsify, densify
from apb_sparse.bench.checkpoint import load_checkpoint
from apb_sparse.bench import interleaved_medians
torch.set_num_threads(1); torch.set_flush_denormal(True)
x = torch.rand(256, 1, 8, 8)
fns = {}
for name in ["hydra", "flyingbird", "harp", "lwm_local", "dense"]:
    f = sorted(glob.glob(f"/tmp/apbrun_final/checkpoints/digits-small_cnn-{name}-unstructured-s0.95-seed0.safetensors") or glob.glob(f"/tmp/apbrun_final/checkpoints/digits-small_cnn-{name}-none-s0-seed0.safetensors"))[0]
    m, cfg = load_checkpoint(f)
    dz = densify(m).eval()
    paths = dict(cfg.get("paths") or {})
    if name == "dense":
        fns["dense"] = (lambda d=sparsify(dz, path="dense", fuse=True).eval(): d(x))
        continue
    p_dense = dict(paths); p_dense["features.0"] = "dense"
    a = sparsify(dz, path=paths, fuse=True).eval(); b = sparsify(dz, path=p_dense, fuse=True).eval()
    print(name, f, "features.0 saved path:", paths.get("features.0"))
    fns[f"{name} saved"] = (lambda a=a: a(x)); fns[f"{name} stem dense"] = (lambda b=b: b(x))
import time
r = interleaved_medians(fns, rounds=11, warmup=1, min_time=0.03, clock=time.process_time)
d = r["dense"]["median_s"]
for k, v in r.items(): print(f"{k:24s} {v['median_s']*1e3:7.3f} ms  {d/v['median_s']:.2f}x")
