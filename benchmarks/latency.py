#!/usr/bin/env python
"""CPU inference latency: the deployed sparse model vs the deployed and eager dense model vs stock
torch sparse (unfold + CSR mm).

For each architecture, batch size and mask: check the outputs agree, warm up, then time every
variant once per round, interleaved, and report medians and speedups over the dense model
deployed the same way (``apb_sparse.deploy(dense, x, layout="dense")``), and over eager torch,
timed in the same run.  Writes a table to stdout and JSON (with the environment) to --out.

    python benchmarks/latency.py --quick          # ResNet-18 only, fewer rounds
    python benchmarks/latency.py                  # ResNet-18 and VGG-16, batch 1 and 32
    python benchmarks/latency.py --per-layer      # per-layer profile (time, useful GFLOP/s)
    python benchmarks/latency.py --device cuda    # the GPU benchmark: benchmarks/latency_cuda.py
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

import apb_sparse
from apb_sparse.bench import environment, interleaved_medians
from apb_sparse.models import get_model


class UnfoldCsrConv2d(nn.Module):
    """What stock torch offers for a sparse conv: im2col (F.unfold) + torch.sparse.mm with CSR."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.groups != 1:
            raise ValueError("stock baseline supports groups == 1 only")
        self.conv = conv
        self.weight = conv.weight.detach().reshape(conv.out_channels, -1).to_sparse_csr()
        self.bias = None if conv.bias is None else conv.bias.detach()

    def forward(self, x):
        c = self.conv
        n, _, h, w = x.shape
        oh = (h + 2 * c.padding[0] - c.dilation[0] * (c.kernel_size[0] - 1) - 1) // c.stride[0] + 1
        ow = (w + 2 * c.padding[1] - c.dilation[1] * (c.kernel_size[1] - 1) - 1) // c.stride[1] + 1
        cols = F.unfold(x, c.kernel_size, c.dilation, c.padding, c.stride)  # (N, CKK, L)
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (CKK, N*L)
        out = torch.sparse.mm(self.weight, cols).reshape(c.out_channels, n, oh * ow).transpose(0, 1)
        out = out.reshape(n, c.out_channels, oh, ow)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


class CsrLinear(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.weight = lin.weight.detach().to_sparse_csr()
        self.bias = None if lin.bias is None else lin.bias.detach()

    def forward(self, x):
        out = torch.sparse.mm(self.weight, x.t()).t()
        return out if self.bias is None else out + self.bias


def stock_sparse(model: nn.Module) -> nn.Module:
    import copy

    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        new = None
        if type(mod) is nn.Conv2d and mod.groups == 1:
            new = UnfoldCsrConv2d(mod)
        elif type(mod) is nn.Linear:
            new = CsrLinear(mod)
        if new is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def make_masks(dense: nn.Module, mask_name: str) -> nn.Module:
    """The masked dense model of ``mask_name`` (us@S, global@S, ch@S, chc@S)."""
    kind, _, value = mask_name.partition("@")
    sparsity = float(value)
    if kind in ("us", "global"):
        masks = apb_sparse.magnitude_masks(dense, sparsity, scope="global" if kind == "global" else "local")
    elif kind in ("ch", "chc"):
        masks = apb_sparse.magnitude_masks(dense, sparsity, structure="filter", coupled=kind == "chc")
    else:
        raise ValueError(f"unknown mask kind {kind!r} in {mask_name!r}")
    masked = apb_sparse.apply_masks(dense, masks)
    if kind in ("ch", "chc"):
        apb_sparse.zero_dead_batchnorm(masked)
    return masked


def build_variants(mask_name: str, dense: nn.Module, x: torch.Tensor, stock: bool,
                   script_ab: bool = False) -> Dict[str, nn.Module]:
    """What is timed, all on the same weights:

    * ``dense``: eager torch on the dense model (the model as users have it);
    * ``dense_deployed``: ``apb_sparse.deploy(dense, x, layout="dense")``, the dense model deployed the
      same way as ours (BatchNorm folded, TorchScript graph): the speedup baseline;
    * ``ours``: ``apb_sparse.deploy(masked, x)``, the deployed sparse model;
    * ``ours_no_script`` (``script_ab``): the same without its TorchScript graph;
    * ``compact`` (channel masks): ``deploy(compact(masked), x, layout="dense")``;
    * ``stock``: unfold + torch CSR matmul (what stock torch offers).
    ``masked`` (the reference for the output check) is not timed.
    """
    kind = mask_name.partition("@")[0]
    masked = make_masks(dense, mask_name)
    variants = {"masked": masked, "dense_deployed": apb_sparse.deploy(dense, x, layout="dense"),
                "ours": apb_sparse.deploy(masked, x)}
    if script_ab:
        variants["ours_no_script"] = apb_sparse.deploy(masked, x, script=False)
    if kind in ("ch", "chc"):
        variants["compact"] = apb_sparse.deploy(apb_sparse.compact(masked, x), x, layout="dense")
    if stock:
        variants["stock"] = stock_sparse(masked)
    return variants


def load_dense(arch: str, weights: Dict[str, str]) -> nn.Module:
    """``get_model(arch)`` in eval mode, with the state dict of ``weights[arch]`` (a safetensors file,
    e.g. from benchmarks/train_for_latency.py) when one is given, else its random initialisation."""
    model = get_model(arch)
    if arch in weights:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights[arch]))
    return model.eval()


def _parse_weights(items: List[str], parser: argparse.ArgumentParser) -> Dict[str, str]:
    out = {}
    for item in items or []:
        arch, sep, path = item.partition("=")
        if not sep or not arch or not path:
            parser.error(f"--weights expects ARCH=FILE, got {item!r}")
        if not os.path.isfile(path):
            parser.error(f"--weights {arch}: no such file {path!r}")
        out[arch] = path
    return out


def run(args) -> dict:
    torch.manual_seed(0)
    results = []
    for arch in args.archs:
        dense = load_dense(arch, args.weights)
        for batch in args.batches:
            x = torch.rand(batch, 3, 32, 32)
            for mask_name in args.masks:
                variants = build_variants(mask_name, dense, x, stock=not args.no_stock, script_ab=args.script_ab)
                with torch.inference_mode():
                    refs = {"masked": variants["masked"](x), "dense": dense(x)}
                    for name, model in variants.items():
                        ref = refs["dense" if name == "dense_deployed" else "masked"]
                        scale = max(1.0, ref.abs().max().item())
                        err = (model(x) - ref).abs().max().item()
                        if err > 1e-3 * scale:
                            raise RuntimeError(f"{arch} {mask_name} {name}: output differs from the masked "
                                               f"model by {err:.3g}")
                fns = {"dense": (lambda m=dense: m(x))}
                fns.update({k: (lambda m=m: m(x)) for k, m in variants.items() if k != "masked"})
                if args.lanes_ab:
                    fns["ours_no_lanes"] = lambda m=variants["ours"]: _without_lanes(m, x)
                timing = interleaved_medians(fns, rounds=args.rounds, warmup=2, min_time=args.min_time)
                report = apb_sparse.sparsity_report(variants["ours"], (batch, 3, 32, 32))
                base = timing["dense_deployed"]["median_s"]
                eager = timing["dense"]["median_s"]
                row = {"arch": arch, "batch": batch, "mask": mask_name, "sparsity": report.sparsity,
                       "baseline": "dense_deployed: apb_sparse.deploy(dense, x, layout='dense'); "
                                   "speedup_vs_eager: against eager dense torch ('dense')",
                       "dense_macs": report.dense_macs, "sparse_macs": report.sparse_macs,
                       "paths": {p: sum(1 for c in variants["ours"].apb_sparse_choices.values() if c.layout == p)
                                 for p in ("dense", "unstructured", "structured")},
                       "median_ms": {k: v["median_s"] * 1e3 for k, v in timing.items()},
                       "speedup": {k: base / v["median_s"] for k, v in timing.items() if k != "dense_deployed"},
                       "speedup_vs_eager": {k: eager / v["median_s"] for k, v in timing.items() if k != "dense"},
                       "times_ms": {k: [t * 1e3 for t in v["times_s"]] for k, v in timing.items()}}
                if "compact" in variants:
                    row["compact_macs"] = apb_sparse.sparsity_report(variants["compact"], (batch, 3, 32, 32)).dense_macs
                results.append(row)
                print(_format_row(row), flush=True)
    return {"environment": environment(), "rounds": args.rounds, "weights": args.weights, "results": results}


def _with_switch_off(switch, model, x):
    """``model(x)`` with a speed switch (``switch(bool) -> previous``) turned off (A/B timing)."""
    prev = switch(False)
    try:
        return model(x)
    finally:
        switch(prev)


def _without_lanes(model, x):
    """``model(x)`` with the images-in-lanes layout of the CPU kernel turned off."""
    return _with_switch_off(apb_sparse.ops.use_lanes, model, x)


def _format_row(r: dict) -> str:
    ms, sp = r["median_ms"], r["speedup"]
    cells = [f"{r['arch']:<9}", f"b={r['batch']:<3}", f"{r['mask']:<10}", f"eager dense {ms['dense']:8.2f} ms",
             f"deployed dense {ms['dense_deployed']:8.2f} ms", f"ours {ms['ours']:8.2f} ms ({sp['ours']:5.2f}x)"]
    if "ours_no_script" in ms:
        cells.append(f"no script {ms['ours_no_script']:8.2f} ms ({sp['ours_no_script']:5.2f}x)")
    if "ours_no_lanes" in ms:
        cells.append(f"lanes off {ms['ours_no_lanes']:8.2f} ms ({sp['ours_no_lanes']:5.2f}x)")
    if "compact" in ms:
        cells.append(f"compact {ms['compact']:8.2f} ms ({sp['compact']:5.2f}x)")
    if "stock" in ms:
        cells.append(f"stock {ms['stock']:8.2f} ms ({sp['stock']:5.2f}x)")
    return "  ".join(cells)


def markdown_table(data: dict) -> str:
    """The results as a Markdown table (speedups over the deployed dense model in the same run)."""
    optional = [(k, title) for k, title in (("ours_no_script", "deploy(script=False)"),
                                            ("ours_no_lanes", "apb_sparse, lanes off"))
                if any(k in r["median_ms"] for r in data["results"])]
    head = "| arch | batch | mask | eager dense ms | deployed dense ms | deploy(sparse) ms (speedup) |"
    head += "".join(f" {title} ms (speedup) |" for _, title in optional)
    lines = [head + " compact ms (speedup) | unfold+CSR ms (speedup) |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(optional)]
    for r in data["results"]:
        ms, sp = r["median_ms"], r["speedup"]

        def cell(k):
            return f"{ms[k]:.2f} ({sp[k]:.2f}x)" if k in ms else "-"
        lines.append(f"| {r['arch']} | {r['batch']} | {r['mask']} | {ms['dense']:.2f} | {ms['dense_deployed']:.2f} | "
                     f"{cell('ours')} | "
                     + "".join(f"{cell(k)} | " for k, _ in optional) + f"{cell('compact')} | {cell('stock')} |")
    return "\n".join(lines)


def per_layer(args) -> dict:
    """Per conv/linear layer: dense vs sparse time and useful GFLOP/s (nonzero MACs x 2 / time)."""
    torch.manual_seed(0)
    rows = []
    for arch in args.archs:
        dense = load_dense(arch, args.weights)
        for batch in args.batches:
            x = torch.rand(batch, 3, 32, 32)
            for mask_name in args.masks:
                masked = make_masks(dense, mask_name)
                sparse = apb_sparse.sparsify(masked)  # per layer: the layers themselves, unfused
                inputs = {}
                hooks = [m.register_forward_hook(lambda m, i, o, n=n: inputs.__setitem__(n, i[0]))
                         for n, m in masked.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
                with torch.inference_mode():
                    masked(x)
                for h in hooks:
                    h.remove()
                dmods, smods = dict(masked.named_modules()), dict(sparse.named_modules())
                report = {l.name: l for l in apb_sparse.sparsity_report(sparse, tuple(x.shape)).layers}
                for name, inp in inputs.items():
                    t = interleaved_medians({"dense": lambda m=dmods[name], i=inp: m(i),
                                             "sparse": lambda m=smods[name], i=inp: m(i)},
                                            rounds=args.rounds, warmup=1, min_time=0.002)
                    lr = report[name]
                    td, ts = t["dense"]["median_s"], t["sparse"]["median_s"]
                    rows.append({"arch": arch, "batch": batch, "mask": mask_name, "layer": name,
                                 "path": lr.layout, "input": list(inp.shape), "weight": lr.shape,
                                 "nonzeros": lr.nonzeros, "dense_ms": td * 1e3, "sparse_ms": ts * 1e3,
                                 "speedup": td / ts, "ideal": lr.dense_macs / max(1, lr.sparse_macs),
                                 "dense_gflops": 2 * lr.dense_macs / td / 1e9,
                                 "useful_gflops": 2 * lr.sparse_macs / ts / 1e9})
                    r = rows[-1]
                    print(f"{arch:<9} b={batch:<3} {mask_name:<9} {name:<22} {r['path']:<12} "
                          f"dense {r['dense_ms']:7.3f} ms ({r['dense_gflops']:5.1f} GF/s)  "
                          f"sparse {r['sparse_ms']:7.3f} ms ({r['useful_gflops']:5.1f} useful GF/s)  "
                          f"{r['speedup']:5.2f}x of ideal {r['ideal']:6.1f}x", flush=True)
    return {"environment": environment(), "rounds": args.rounds, "weights": args.weights, "per_layer": rows}


def main(argv: List[str] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--device=cuda" in argv or any(a == "--device" and b == "cuda" for a, b in zip(argv, argv[1:])):
        # The CUDA benchmark (cuDNN TF32 / bf16 channels_last vs ours, CUDA graphs) is its own module.
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import latency_cuda
        return latency_cuda.main(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="ResNet-18 only, fewer masks and rounds")
    p.add_argument("--archs", nargs="+", default=None, help="architectures (default resnet18 vgg16)")
    p.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes (default 1 32)")
    p.add_argument("--masks", nargs="+", default=None,
                   help="us@S (per-layer magnitude), global@S (global magnitude), ch@S (filters, each conv its own), "
                        "chc@S (filters coupled across residual joins, fully removable by compact); "
                        "default us@0 us@0.5 us@0.9 us@0.95 us@0.99 ch@0.5")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15, quick 5)")
    p.add_argument("--min-time", type=float, default=0.05,
                   help="per round, call each variant repeatedly for at least this many seconds and record the "
                        "mean per call (steady-state latency); 0 = one cold call per round")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-stock", action="store_true", help="skip the unfold + CSR baseline")
    p.add_argument("--lanes-ab", action="store_true",
                   help="also time apb_sparse with the images-in-lanes layout turned off (in-run A/B)")
    p.add_argument("--script-ab", action="store_true",
                   help="also time deploy(model, script=False): the snapshot without its TorchScript graph")
    p.add_argument("--per-layer", action="store_true", help="per-layer profile instead of end to end")
    p.add_argument("--weights", nargs="+", default=None, metavar="ARCH=FILE",
                   help="trained weights (safetensors state dict, e.g. from benchmarks/train_for_latency.py) "
                        "for an architecture; default: random initialisation")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/latency_cpu[_per_layer].json)")
    args = p.parse_args(argv)
    args.weights = _parse_weights(args.weights, p)
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    args.archs = args.archs or (["resnet18"] if args.quick else ["resnet18", "vgg16"])
    args.batches = args.batches or [1, 32]
    args.masks = args.masks or (["us@0.9", "us@0.99", "ch@0.5"] if args.quick else
                                ["us@0", "us@0.5", "us@0.9", "us@0.95", "us@0.99", "ch@0.5"])
    args.rounds = args.rounds or (5 if args.quick else 15)
    torch.set_flush_denormal(True)
    data = per_layer(args) if args.per_layer else run(args)
    if not args.per_layer:
        print()
        print(markdown_table(data))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   "latency_cpu_per_layer.json" if args.per_layer else "latency_cpu.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(data, f, indent=1)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
