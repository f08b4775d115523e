#!/usr/bin/env python
"""CUDA inference latency: dense cuDNN (TF32, and bf16 channels_last) vs apb_sparse (fp32, bf16).

For each architecture, batch size and mask, four variants of the same masked model:

* ``dense_tf32``: the masked dense model, float32 NCHW, cuDNN / cuBLAS in their default TF32 mode
  (what a user of torch gets on Ampere and later), ``cudnn.benchmark`` on.
* ``dense_bf16_cl``: the same in bfloat16, channels_last (cuDNN's fastest layout for tensor cores).
* ``ours_fp32``: ``apb_sparse.deploy(masked, x)`` (the deployment snapshot every benchmark times) moved
  to the GPU in float32 (our kernels, CUDA cores).
* ``ours_bf16``: the same in bfloat16 (bf16 storage, float accumulation).

Correctness first: every variant's output is compared with the exact float32 dense output
(TF32 off) and the run stops if one is off by more than its precision allows.  Then each variant
is captured in a CUDA graph (after a warm-up on a side stream) and timed by CUDA events around
``reps`` replays, once per round, the variants interleaved in a rotating order; medians over the
rounds.  The JSON (default benchmarks/results/latency_cuda.json) holds the device name, torch,
CUDA and cuDNN versions, every time and every ratio (dense time / variant time, for both dense
baselines).

    python benchmarks/latency_cuda.py                    # ResNet-18 and VGG-16, batch 1 and 128
    python benchmarks/latency_cuda.py --quick            # ResNet-18, fewer masks and rounds
    python benchmarks/latency.py --device cuda [...]     # the same, through the CPU benchmark

Needs a CUDA GPU and an apb_sparse build with CUDA kernels; without them it exits with status 2
and says so.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

import apb_sparse
from apb_sparse.bench import environment
from apb_sparse.models import get_model

VARIANTS = ("dense_tf32", "dense_bf16_cl", "ours_fp32", "ours_bf16")
BASELINES = ("dense_tf32", "dense_bf16_cl")
# Largest allowed |variant - exact fp32| / max(1, max |exact|): TF32 (10-bit mantissa) and bf16
# (8-bit) inputs through 16-20 layers; ours_fp32 is exact float32 up to summation order.
TOLERANCE = {"dense_tf32": 5e-2, "dense_bf16_cl": 0.25, "ours_fp32": 1e-3, "ours_bf16": 0.25}
DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latency_cuda.json")


def cuda_problem() -> Optional[str]:
    """Why this benchmark cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return ("benchmarks/latency_cuda.py needs a CUDA GPU: torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
    if not apb_sparse.ops.available():
        return "apb_sparse._C is not built: `pip install --no-build-isolation -e .` on this machine first"
    if getattr(apb_sparse.ops._C, "cuda_built", 0) != 1:
        return ("apb_sparse was built without CUDA kernels (no nvcc / CUDA_HOME at build time, or "
                "APB_SPARSE_NO_CUDA=1): rebuild with a CUDA toolkit")
    return None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="ResNet-18 only, masks us@0.9 us@0.99, 5 rounds")
    p.add_argument("--archs", nargs="+", default=None, help="architectures (default resnet18 vgg16)")
    p.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes (default 1 128)")
    p.add_argument("--masks", nargs="+", default=None,
                   help="us@S (per-layer magnitude) or global@S (global magnitude); default us@0.9 us@0.95 us@0.99")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="variants to time")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15, quick 5)")
    p.add_argument("--min-time-ms", type=float, default=20.0,
                   help="per round and variant, replay the graph enough times to last about this long")
    p.add_argument("--no-graphs", action="store_true", help="time eager calls instead of CUDA-graph replays")
    p.add_argument("--out", default=None, help=f"JSON output (default {DEFAULT_RESULTS})")
    p.add_argument("--device", default="cuda", choices=("cuda",), help=argparse.SUPPRESS)  # from latency.py
    args = p.parse_args(argv)
    args.archs = args.archs or (["resnet18"] if args.quick else ["resnet18", "vgg16"])
    args.batches = args.batches or [1, 128]
    args.masks = args.masks or (["us@0.9", "us@0.99"] if args.quick else ["us@0.9", "us@0.95", "us@0.99"])
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be >= 1")
    args.rounds = args.rounds or (5 if args.quick else 15)
    if any(b < 1 for b in args.batches):
        p.error("--batches must be >= 1")
    for m in args.masks:
        parse_mask(m, error=p.error)
    if "dense_tf32" not in args.variants and "dense_bf16_cl" not in args.variants:
        p.error("--variants must include a dense baseline (dense_tf32 or dense_bf16_cl)")
    args.out = args.out or DEFAULT_RESULTS
    return args


def parse_mask(name: str, error: Callable[[str], None] = None):
    """``"us@0.9"`` -> ``("us", 0.9)``."""
    kind, _, value = name.partition("@")
    try:
        sparsity = float(value)
    except ValueError:
        sparsity = -1.0
    if kind not in ("us", "global") or not 0.0 <= sparsity < 1.0:
        msg = f"mask {name!r}: expected us@S or global@S with 0 <= S < 1"
        if error is not None:
            error(msg)
        raise ValueError(msg)
    return kind, sparsity


def build_variants(arch: str, mask: str, device: str = "cuda", variants: Sequence[str] = VARIANTS,
                   seed: int = 0) -> Dict[str, dict]:
    """The masked model in each variant: ``{name: {"model", "dtype", "memory_format"}}``, plus
    ``"exact"`` (the float32 masked dense model, the reference) and the per-layout layer counts.

    Runs on any device (the model and mask building is device-independent); only the forward
    of the bf16 sparse model needs CUDA kernels."""
    torch.manual_seed(seed)
    dense = get_model(arch).eval()
    kind, sparsity = parse_mask(mask)
    masks = apb_sparse.magnitude_masks(dense, sparsity, scope="global" if kind == "global" else "local")
    masked = apb_sparse.apply_masks(dense, masks).eval()
    plain = apb_sparse.densify(masked)  # plain nn.Conv2d / nn.Linear holding weight * mask: cuDNN / cuBLAS
    out: Dict[str, dict] = {"exact": {"model": copy.deepcopy(plain).to(device), "dtype": torch.float32,
                                      "memory_format": torch.contiguous_format}}
    ours = None
    if any(v.startswith("ours") for v in variants):
        # Deployed (and checked) on the CPU; each variant's copy traces its graphs on first use on
        # its own device and dtype (a deployed model keys its graphs by input signature).
        ours = apb_sparse.deploy(masked, torch.rand(2, 3, 32, 32))
    for v in variants:
        if v == "dense_tf32":
            out[v] = {"model": copy.deepcopy(plain).to(device), "dtype": torch.float32,
                      "memory_format": torch.contiguous_format}
        elif v == "dense_bf16_cl":
            model = copy.deepcopy(plain).to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last)
            out[v] = {"model": model, "dtype": torch.bfloat16, "memory_format": torch.channels_last}
        elif v == "ours_fp32":
            out[v] = {"model": copy.deepcopy(ours).to(device), "dtype": torch.float32,
                      "memory_format": torch.contiguous_format}
        elif v == "ours_bf16":
            out[v] = {"model": copy.deepcopy(ours).to(device=device, dtype=torch.bfloat16), "dtype": torch.bfloat16,
                      "memory_format": torch.contiguous_format}
        else:
            raise ValueError(f"unknown variant {v!r}; expected one of {VARIANTS}")
    if ours is not None:
        choices = getattr(ours, "apb_sparse_choices", {})
        out["paths"] = {p: sum(1 for c in choices.values() if c.layout == p) for p in ("dense", "unstructured",
                                                                                      "filter")}
        out["report"] = apb_sparse.sparsity_report(ours, (1, 3, 32, 32))
    return out


def ratios(median_ms: Dict[str, float]) -> Dict[str, Dict[str, float]]:
    """``{"vs_<baseline>": {variant: baseline time / variant time}}`` for every timed baseline
    (> 1: the variant is faster)."""
    return {f"vs_{b}": {v: median_ms[b] / t for v, t in median_ms.items() if v != b}
            for b in BASELINES if b in median_ms}


def max_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max(1, max |ref|), in float32."""
    return float((got.float() - ref).abs().max()) / max(1.0, float(ref.abs().max()))


class _Timed:
    """One variant ready to time: a CUDA graph replay (or an eager call) on a static input."""

    def __init__(self, model: nn.Module, x: torch.Tensor, graphs: bool):
        self.x = x
        self.model = model
        self.graph = None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):  # cuDNN autotuning, allocator warm-up, CSR validation (cached)
                self.y = model(x)
        torch.cuda.current_stream().wait_stream(side)
        if graphs:
            self.graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(self.graph):
                self.y = model(x)

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.no_grad():
                self.y = self.model(self.x)


def time_interleaved(fns: Dict[str, Callable[[], None]], rounds: int, min_time_ms: float) -> Dict[str, dict]:
    """CUDA-event time per call of each fn: ``reps`` calls per measurement (sized from a first
    timing to last about min_time_ms), one measurement per round, variants in a rotating order."""
    names = list(fns)
    reps = {}
    for n in names:
        fns[n]()
        t = _event_time(fns[n], 3) / 3
        reps[n] = int(min(1000, max(1, round(min_time_ms / max(t, 1e-3)))))
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            times[n].append(_event_time(fns[n], reps[n]) / reps[n])
    return {n: {"median_ms": float(torch.tensor(times[n]).median()), "times_ms": times[n], "reps": reps[n]}
            for n in names}


def _event_time(fn: Callable[[], None], reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def cuda_environment() -> dict:
    env = environment()
    props = torch.cuda.get_device_properties(0)
    env.update({"gpu": torch.cuda.get_device_name(0), "gpu_capability": list(torch.cuda.get_device_capability(0)),
                "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cudnn": torch.backends.cudnn.version(),
                "torch_cuda": torch.version.cuda})
    return env


def run(args) -> dict:
    torch.backends.cudnn.benchmark = True
    results = []
    for arch in args.archs:
        for mask in args.masks:
            built = build_variants(arch, mask, "cuda", args.variants)
            for batch in args.batches:
                g = torch.Generator().manual_seed(batch)
                x32 = torch.rand(batch, 3, 32, 32, generator=g).cuda()
                # The reference: exact float32 (no TF32).
                prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
                torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
                with torch.no_grad():
                    ref = built["exact"]["model"](x32).float()
                torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # torch's conv default
                errors, fns = {}, {}
                for v in args.variants:
                    spec = built[v]
                    x = x32.to(dtype=spec["dtype"]).contiguous(memory_format=spec["memory_format"])
                    with torch.no_grad():
                        errors[v] = max_error(spec["model"](x), ref)
                    if not errors[v] <= TOLERANCE[v]:
                        raise RuntimeError(f"{arch} {mask} batch {batch} {v}: output differs from the exact float32 "
                                           f"dense model by {errors[v]:.3g} (relative), more than {TOLERANCE[v]}")
                    fns[v] = _Timed(spec["model"], x, graphs=not args.no_graphs)
                timing = time_interleaved(fns, args.rounds, args.min_time_ms)
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev
                row = make_row(arch, batch, mask, built, timing, errors, graphs=not args.no_graphs)
                results.append(row)
                print(format_row(row), flush=True)
                del fns
                torch.cuda.empty_cache()
    return {"environment": cuda_environment(), "rounds": args.rounds, "min_time_ms": args.min_time_ms,
            "graphs": not args.no_graphs, "variants": list(args.variants), "results": results}


def make_row(arch: str, batch: int, mask: str, built: dict, timing: Dict[str, dict], errors: Dict[str, float],
             graphs: bool) -> dict:
    median = {v: t["median_ms"] for v, t in timing.items()}
    row = {"arch": arch, "batch": batch, "mask": mask, "cuda_graphs": graphs, "median_ms": median,
           "speedup": ratios(median), "max_rel_error": errors,
           "times_ms": {v: t["times_ms"] for v, t in timing.items()}, "reps": {v: t["reps"] for v, t in timing.items()}}
    if "report" in built:
        rep = built["report"]
        row.update({"sparsity": rep.sparsity, "dense_macs_per_image": rep.dense_macs,
                    "sparse_macs_per_image": rep.sparse_macs, "paths": built["paths"]})
    return row


def format_row(r: dict) -> str:
    ms = r["median_ms"]
    cells = [f"{r['arch']:<9}", f"b={r['batch']:<4}", f"{r['mask']:<9}"]
    for v in VARIANTS:
        if v in ms:
            cells.append(f"{v} {ms[v]:8.3f} ms")
    for b, sp in r["speedup"].items():
        cells.append(b + ": " + " ".join(f"{v}={s:.2f}x" for v, s in sp.items()))
    return "  ".join(cells)


def markdown_table(data: dict) -> str:
    """Medians and ratios as a Markdown table."""
    vs = [v for v in VARIANTS if v in data["variants"]]
    lines = ["| arch | batch | mask | " + " | ".join(f"{v} ms" for v in vs) + " | ours_fp32 / dense_tf32 | "
             "ours_bf16 / dense_bf16_cl |", "|---" * (3 + len(vs) + 2) + "|"]
    for r in data["results"]:
        ms, sp = r["median_ms"], r["speedup"]

        def ratio(b, v):
            s = sp.get(f"vs_{b}", {}).get(v)
            return f"{s:.2f}x" if s is not None else "-"
        lines.append(f"| {r['arch']} | {r['batch']} | {r['mask']} | " + " | ".join(f"{ms[v]:.3f}" for v in vs)
                     + f" | {ratio('dense_tf32', 'ours_fp32')} | {ratio('dense_bf16_cl', 'ours_bf16')} |")
    return "\n".join(lines)


def write_json(data: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    problem = cuda_problem()
    if problem is not None:
        print(f"latency_cuda: error: {problem}", file=sys.stderr)
        return 2
    data = run(args)
    print()
    print(markdown_table(data))
    print(f"\nwrote {write_json(data, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
