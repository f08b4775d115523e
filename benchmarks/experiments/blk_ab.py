"""Output-channel blocking prototype A/B. Needs benchmarks/results/out_blocking_prototype.diff applied (git apply) and rebuilt: _C._set_out_blocking exists only there.

One-off experiment of the kernel-v3 round, kept so the numbers in README / the closing note can be
reproduced; not part of the test or benchmark suites."""
import torch, sys
import torch.nn.functional as F
from apb_sparse import ops, _C
from apb_sparse.bench import interleaved_medians
torch.set_num_threads(int(sys.argv[1]))
def mode(m, f):
    def g():
        p = _C._set_out_blocking(m)
        try: f()
        finally: _C._set_out_blocking(p)
    return g
for (n,c,hw,o,s,dens) in [(1,64,32,64,1,0.5),(1,128,16,128,1,0.33),(1,256,8,256,1,0.17),(32,64,32,64,1,0.5),(32,128,16,128,1,0.33),(32,256,8,256,1,0.17),(32,64,32,64,1,0.1),(1,64,32,64,1,0.1)]:
    x=torch.randn(n,c,hw,hw)
    g=torch.Generator().manual_seed(0)
    w=torch.randn(o,c,3,3)*(torch.rand(o,c,3,3,generator=g)<dens)
    v,rp,ci=ops.pack_csr(w)
    f=lambda: ops.sparse_conv2d(x,v,rp,ci,w.shape,None,s,1)
    ref=F.conv2d(x,w,None,s,1)
    _C._set_out_blocking(2); got=f(); _C._set_out_blocking(1)
    err=(got-ref).abs().max().item()
    r=interleaved_medians({"dense": lambda: F.conv2d(x,w,None,s,1), "blocked": mode(2,f), "plain": mode(0,f)}, rounds=5, warmup=1, min_time=0.05)
    d=r["dense"]["median_s"]
    macs = float((w!=0).sum())*n*hw*hw/s/s
    print((n,c,hw,o,dens), f"err {err:.1e} dense {d*1e3:.2f} ms", "  ".join(f"{k} {d/r[k]['median_s']:.2f}x ({2*macs/r[k]['median_s']/1e9:.0f} GF/s)" for k in ("blocked","plain")), flush=True)
