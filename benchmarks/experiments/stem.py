"""Stem conv A/B (issue 14/15 note): dense+ReLU vs our fused op, interleaved. Usage: python stem.py THREADS

One-off experiment of the kernel-v3 round, kept so the numbers in README / the closing note can be
reproduced; not part of the test or benchmark suites."""
import torch, sys
import torch.nn.functional as F
from apb_sparse import ops
from apb_sparse.bench import interleaved_medians
torch.set_num_threads(int(sys.argv[1]))
for (n,c,hw,o,dens) in [(256,1,8,8,16) and (256,1,8,16,1.0),(256,1,8,16,0.35),(32,3,32,64,1.0),(1,3,32,64,1.0),(256,1,16,16,1.0),(64,1,16,16,1.0)]:
    x=torch.randn(n,c,hw,hw)
    g=torch.Generator().manual_seed(0)
    w=torch.randn(o,c,3,3)*(torch.rand(o,c,3,3,generator=g)<dens)
    b=torch.randn(o)
    v,rp,ci=ops.pack_csr(w)
    r=interleaved_medians({"dense+relu": lambda: torch.relu(F.conv2d(x,w,b,1,1)), "sparse fused relu": lambda: ops.sparse_conv2d(x,v,rp,ci,w.shape,b,1,1,relu=True)}, rounds=7, warmup=1, min_time=0.05)
    d=r["dense+relu"]["median_s"]
    print((n,c,hw,o,dens), f"dense+relu {d*1e3:.3f} ms  sparse {r['sparse fused relu']['median_s']*1e3:.3f} ms  ratio {d/r['sparse fused relu']['median_s']:.2f}x")
