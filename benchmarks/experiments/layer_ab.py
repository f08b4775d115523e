"""Lanes vs strip layout per layer (batch 32). The lanes path only takes maps <= 64 output pixels, so the larger-map rows need the limits in lanes_units() raised (as done for this experiment).

One-off experiment of the kernel-v3 round, kept so the numbers in README / the closing note can be
reproduced; not part of the test or benchmark suites."""
import torch, sys
import torch.nn.functional as F
from apb_sparse import ops
from apb_sparse.bench import interleaved_medians
torch.set_num_threads(int(sys.argv[1]))
def lanes(flag, f):
    def g():
        p = ops.use_lanes(flag)
        try: f()
        finally: ops.use_lanes(p)
    return g
for (n,c,hw,o,s,dens) in [(32,64,32,64,1,0.5),(32,128,16,128,1,0.33),(32,256,8,256,1,0.17),(32,256,8,256,1,0.05),(32,512,4,512,1,0.05),(32,64,32,64,1,0.1)]:
    x=torch.randn(n,c,hw,hw)
    g=torch.Generator().manual_seed(0)
    w=torch.randn(o,c,3,3)*(torch.rand(o,c,3,3,generator=g)<dens)
    v,rp,ci=ops.pack_csr(w)
    f=lambda: ops.sparse_conv2d(x,v,rp,ci,w.shape,None,s,1)
    r=interleaved_medians({"dense": lambda: F.conv2d(x,w,None,s,1), "lanes": lanes(True,f), "strip": lanes(False,f)}, rounds=5, warmup=1, min_time=0.05)
    d=r["dense"]["median_s"]
    macs = float((w!=0).sum())*n*hw*hw/s/s
    print((n,c,hw,o,dens), f"dense {d*1e3:.2f} ms", "  ".join(f"{k} {d/r[k]['median_s']:.2f}x ({2*macs/r[k]['median_s']/1e9:.0f} GF/s)" for k in ("lanes","strip")), flush=True)
