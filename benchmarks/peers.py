#!/usr/bin/env python
"""apb_sparse against the engines users would pick instead, on the same pruned weights.

For every architecture, mask and batch size (a "case"), the driver builds one pruned model
(random initialisation, per-layer or global magnitude masks, BatchNorm statistics re-estimated on
random inputs so that activations keep a sane scale) and hands it to every engine:

* ``torch``: the plain model in torch eager (dense convolutions holding the zeros, BatchNorm kept);
* ``apb_sparse``: the project's deployed form (``apb_sparse.deploy(model, x)`` where it exists,
  else ``apb_sparse.sparsify(model, fuse=True)``);
* ``deepsparse``: DeepSparse 1.8.0 (the last release that installs) on an ONNX export of the same
  model (BatchNorm folded, zeros kept), in its own virtual environment because it pins numpy 1.26
  and onnx 1.14;
* ``onnxruntime`` and ``openvino`` (forced to f32; OpenVINO's default on AVX-512 BF16 CPUs is
  bf16) on the same ONNX file, from a second virtual environment (or this Python, if it has them).

Every engine is a persistent worker process (this file run with ``--worker ENGINE``) talking JSON
lines on its stdin / stdout.  The driver first checks every engine's output against torch on the
timed input, then times the engines round by round, interleaved (the starting engine rotates each
round), and reports medians.  The physical limit of a case is its nonzero multiply-adds at this
machine's fp32 GEMM rate (torch matmul, measured at start).  Engines whose Python or package is
missing are skipped with a message.  Only ``--threads`` cores are meant to be used by each engine.

    python benchmarks/peers.py                                  # the full table (about 15 min)
    python benchmarks/peers.py --archs resnet18 --batches 32 --masks local@0.9 --per-layer
    python benchmarks/peers.py --engines torch apb_sparse --width 8 --masks local@0.99 --rounds 2

Setting up the peer engines (never committed; any paths work, these are the defaults):

    python -m venv /work/venvs/deepsparse && /work/venvs/deepsparse/bin/pip install deepsparse==1.8.0
    python -m venv /work/venvs/onnxeng && /work/venvs/onnxeng/bin/pip install onnxruntime openvino numpy

The main environment needs the ``onnx`` package for ``torch.onnx.export`` when an ONNX engine runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ENGINES = ("torch", "apb_sparse", "deepsparse", "onnxruntime", "openvino")
# "apb_sparse_base": the same deployed form from another checkout (--baseline-root), for an in-run
# A/B of two versions of the kernel.
TORCH_ENGINES = ("torch", "apb_sparse", "apb_sparse_base")
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DEEPSPARSE_PYTHON = "/work/venvs/deepsparse/bin/python"
DEFAULT_ONNX_PYTHON = "/work/venvs/onnxeng/bin/python"


# --------------------------------------------------------------------------------------------
# Worker side: imports only the standard library and numpy at module level, so that it runs in a
# virtual environment without torch.
# --------------------------------------------------------------------------------------------

class _Runner:
    """One engine holding one loaded case: ``run()`` computes the output of the case's input."""

    def __init__(self, engine: str, threads: int):
        self.engine = engine
        self.threads = threads
        self.fn = None
        self.model = None  # torch engines: the module, for the per-layer profile
        self.onnx = None
        self.x = None
        self.batch = None

    def hello(self) -> dict:
        """Imports the engine (raises when it is missing); returns its version."""
        if self.engine in TORCH_ENGINES:
            import torch

            import apb_sparse
            torch.set_num_threads(self.threads)
            torch.set_flush_denormal(True)
            return {"version": f"torch {torch.__version__}, apb_sparse from {os.path.dirname(apb_sparse.__file__)}",
                    "deploy": hasattr(apb_sparse, "deploy")}
        if self.engine == "deepsparse":
            import deepsparse
            return {"version": f"deepsparse {deepsparse.__version__}"}
        if self.engine == "onnxruntime":
            import onnxruntime
            return {"version": f"onnxruntime {onnxruntime.__version__}"}
        if self.engine == "openvino":
            import openvino
            return {"version": f"openvino {openvino.__version__}"}
        raise ValueError(f"unknown engine {self.engine!r}")

    def load(self, msg: dict) -> dict:
        import numpy as np

        self.fn = self.model = None
        self.x = np.load(msg["input"])
        self.batch = int(self.x.shape[0])
        self.onnx = msg["onnx"]
        t0 = time.perf_counter()
        note = ""
        if self.engine in TORCH_ENGINES:
            import torch

            import apb_sparse
            masked = torch.load(msg["model"], weights_only=False).eval()
            x = torch.from_numpy(self.x)
            if self.engine == "torch":
                model = apb_sparse.densify(masked).eval()  # plain Conv2d / BatchNorm2d modules
                note = "densify(model): torch eager"
            elif hasattr(apb_sparse, "deploy"):  # apb_sparse and apb_sparse_base
                import inspect
                if msg.get("tune") and "tune" in inspect.signature(apb_sparse.deploy).parameters:
                    model = apb_sparse.deploy(masked, x, tune=True)
                    note = "apb_sparse.deploy(model, x, tune=True)"
                else:
                    model = apb_sparse.deploy(masked, x)
                    note = "apb_sparse.deploy(model, x)"
            else:
                model = apb_sparse.sparsify(masked, fuse=True)
                note = "apb_sparse.sparsify(model, fuse=True)"
            self.model = model

            def fn():
                with torch.inference_mode():
                    return model(x)
            self.fn = fn
            self._to_numpy = lambda y: y.detach().numpy()
        elif self.engine == "deepsparse":
            import deepsparse

            engine = deepsparse.compile_model(self.onnx, batch_size=self.batch, num_cores=self.threads)
            xs = [np.ascontiguousarray(self.x)]
            self.fn = lambda: engine.run(xs)[0]
            self._to_numpy = lambda y: y
            note = f"compile_model(num_cores={self.threads})"
        elif self.engine == "onnxruntime":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(self.onnx, so, providers=["CPUExecutionProvider"])
            name = sess.get_inputs()[0].name
            self.fn = lambda: sess.run(None, {name: self.x})[0]
            self._to_numpy = lambda y: y
            note = f"CPUExecutionProvider, intra_op_num_threads={self.threads}"
        elif self.engine == "openvino":
            import openvino as ov

            core = ov.Core()
            compiled = core.compile_model(self.onnx, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                             "INFERENCE_NUM_THREADS": self.threads,
                                                             "PERFORMANCE_HINT": "LATENCY"})
            request = compiled.create_infer_request()
            self.fn = lambda: request.infer({0: self.x})[compiled.output(0)]
            self._to_numpy = lambda y: np.asarray(y)
            note = f"f32, INFERENCE_NUM_THREADS={self.threads}, LATENCY"
        y = self._to_numpy(self.fn())
        out = msg["output"]
        np.save(out, np.ascontiguousarray(y, dtype=np.float32))
        return {"output": out, "load_s": time.perf_counter() - t0, "note": note}

    def time(self, msg: dict) -> dict:
        """Per-call seconds: calls repeated for at least min_time seconds (steady state)."""
        min_time = float(msg.get("min_time", 0.0))
        n, t0 = 0, time.perf_counter()
        while True:
            self.fn()
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time:
                break
        return {"s": elapsed / n, "calls": n}

    def profile(self, msg: dict) -> dict:
        """Per-layer times: hooks on the torch engines' conv / linear modules, DeepSparse's own
        debug analysis; {} for engines without one."""
        iters = int(msg.get("iterations", 10))
        if self.engine in TORCH_ENGINES:
            return {"layers": _torch_layer_times(self.model, self.fn, iters)}
        if self.engine == "deepsparse":
            from deepsparse import model_debug_analysis

            res = model_debug_analysis(self.onnx, [self.x], batch_size=self.batch, num_cores=self.threads,
                                       num_iterations=iters, num_warmup_iterations=3)
            layers = []
            for li in res["layer_info"]:
                subs = li.get("sub_layer_info") or []
                layers.append(_ds_layer(li, [_ds_layer(s, []) for s in subs]))
            return {"layers": layers, "total_ms": res.get("average_total_time")}
        return {"layers": []}


def _ds_layer(li: dict, subs: list) -> dict:
    def vals(key):
        v = li.get(key)
        return list(v.values()) if isinstance(v, dict) else v
    return {"name": li.get("name"), "canonical_name": li.get("canonical_name"), "output_dims": vals("output_dims"),
            "kernel_dims": vals("kernel_dims"), "strides": vals("strides"), "ms": li.get("average_run_time_in_ms"),
            "teraflops": li.get("average_teraflops_per_second"), "sub_layers": subs}


# A traced graph calls aten::_convolution directly (the dense convs that deploy keeps, such as the
# denser shortcuts of global masks), eager code aten::conv2d; nested calls are dropped below.
LAYER_OPS = ("apb_sparse::sparse_conv2d", "apb_sparse::sparse_conv2d_pair", "apb_sparse::sparse_linear",
             "apb_sparse::masked_conv2d", "aten::conv2d", "aten::convolution", "aten::_convolution",
             "aten::linear")


def _torch_layer_times(model, fn, iters: int) -> list:
    """Median wall time of every conv / linear op call of one forward, in call order, from the
    torch profiler (works for TorchScript graphs and fused forwards, where module hooks do not)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(iters):
            fn()
    events = [e for e in prof.events() if e.name in LAYER_OPS]
    # keep only outermost layer ops (aten::linear may call nothing of the set, but be safe)
    events = [e for e in events if not any(
        o is not e and o.name in LAYER_OPS and o.time_range.start <= e.time_range.start and e.time_range.end <= o.time_range.end
        for o in events if o.thread == e.thread)] if len(events) < 5000 else events
    events.sort(key=lambda e: e.time_range.start)
    per_call = len(events) // iters if iters else 0
    if per_call == 0 or per_call * iters != len(events):
        return []
    layers = []
    for i in range(per_call):
        ev = [events[k * per_call + i] for k in range(iters)]
        shapes = ev[0].input_shapes[0] if ev[0].input_shapes else []
        # conv / linear layers the call computes: a deployed pair runs two convs, three with its
        # shortcut (argument 23, shortcut_values, recorded with a shape when given)
        convs = 1
        if ev[0].name == "apb_sparse::sparse_conv2d_pair":
            args = ev[0].input_shapes or []
            convs = 2 + int(len(args) > 23 and bool(args[23]))
        layers.append({"index": i, "op": ev[0].name, "input": list(shapes), "layers": convs,
                       "ms": statistics.median((e.time_range.end - e.time_range.start) / 1e3 for e in ev)})
    return layers


def worker_main(engine: str, threads: int) -> int:
    # Replies go to the original stdout; everything engines print (DeepSparse's banner, logs)
    # is sent to stderr so that it cannot corrupt the protocol.
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    runner = _Runner(engine, threads)
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "quit":
            break
        try:
            if cmd == "hello":
                out = runner.hello()
            elif cmd == "load":
                out = runner.load(msg)
            elif cmd == "time":
                out = runner.time(msg)
            elif cmd == "profile":
                out = runner.profile(msg)
            else:
                raise ValueError(f"unknown command {cmd!r}")
            out["ok"] = True
        except Exception as e:  # reported to the driver, which skips the engine for this case
            out = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        reply.write(json.dumps(out) + "\n")
    return 0


# --------------------------------------------------------------------------------------------
# Driver side.
# --------------------------------------------------------------------------------------------

class Worker:
    """A worker process for one engine, driven with JSON lines."""

    def __init__(self, engine: str, python: str, threads: int, env: dict):
        self.engine = engine
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--worker", engine, "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True,
                                     env=env, bufsize=1)

    def call(self, **msg) -> dict:
        """Sends one command and waits for its reply."""
        return self._call(msg)

    def _call(self, msg: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError) as e:
            return {"ok": False, "error": f"worker died: {e}"}
        if not line:
            return {"ok": False, "error": f"worker exited (rc {self.proc.poll()})"}
        return json.loads(line)

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def _python_for(engine: str, args) -> str:
    if engine in TORCH_ENGINES:
        return sys.executable
    if engine == "deepsparse":
        return args.deepsparse_python
    if args.onnx_python:
        return args.onnx_python
    return DEFAULT_ONNX_PYTHON if os.path.exists(DEFAULT_ONNX_PYTHON) else sys.executable


def start_workers(args) -> tuple:
    """Starts every requested engine; returns (workers, versions, skipped reasons)."""
    import apb_sparse

    env = dict(os.environ)
    # Workers import the same apb_sparse as the driver (a worktree or an installed copy).
    root = os.path.dirname(os.path.dirname(os.path.abspath(apb_sparse.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(args.threads)
    workers, versions, skipped = {}, {}, {}
    engines = list(args.engines) + (["apb_sparse_base"] if args.baseline_root else [])
    for engine in engines:
        python = _python_for(engine, args)
        wenv = env
        if engine == "apb_sparse_base":
            wenv = dict(env, PYTHONPATH=os.path.abspath(args.baseline_root))
        if not os.path.exists(python):
            skipped[engine] = f"no Python at {python} (see the setup lines in this script's docstring)"
            continue
        w = Worker(engine, python, args.threads, wenv)
        r = w.call(cmd="hello")
        if not r.get("ok"):
            skipped[engine] = f"{python}: {r.get('error')}"
            w.close()
            continue
        workers[engine] = w
        versions[engine] = r["version"]
        if engine.startswith("apb_sparse"):
            versions[engine + "_form"] = "deploy" if r.get("deploy") else "sparsify(fuse=True)"
        if engine == "apb_sparse_base":
            versions[engine] += f" (commit {_commit_of(args.baseline_root)})"
    for engine, why in skipped.items():
        print(f"skipping {engine}: {why}", flush=True)
    return workers, versions, skipped


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of all threads of a process (0 if it is gone)."""
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    except OSError:
        return 0.0
    return total / os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (/proc/stat, everything but idle and iowait)."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
    except OSError:
        return 0.0
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """Fraction of the machine's CPUs that processes other than this benchmark used between
    start() and stop(): the benchmark's own numbers are only comparable near 0."""

    def __init__(self, pids):
        self.pids = [os.getpid()] + list(pids)

    def start(self):
        self.t0, self.b0 = time.perf_counter(), _busy_seconds()
        self.o0 = sum(_cpu_seconds(p) for p in self.pids)

    def stop(self) -> float:
        wall = time.perf_counter() - self.t0
        ours = sum(_cpu_seconds(p) for p in self.pids) - self.o0
        other = _busy_seconds() - self.b0 - ours
        return max(0.0, other) / max(1e-9, wall * (os.cpu_count() or 1))


def _commit_of(root: str) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gemm_rate(threads: int, n: int, reps: int = 3) -> float:
    """fp32 GFLOP/s of an n x n x n torch matmul (median of reps after one warm-up)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def build_case(arch: str, mask: str, width, seed: int = 0):
    """The pruned model of a case: random init, magnitude masks, BatchNorm statistics re-estimated
    (cumulative average over 8 batches of 32 uniform random images) after masking."""
    import torch

    import apb_sparse
    from apb_sparse.models import get_model

    kind, _, value = mask.partition("@")
    sparsity = float(value)
    torch.manual_seed(seed)
    kw = {} if width is None else {"width": width}
    model = get_model(arch, **kw).eval()
    if kind == "local":
        masks = apb_sparse.magnitude_masks(model, sparsity, scope="local")
    elif kind == "global":
        # one threshold over the convolutions (the classifier stays dense), as global pruning
        # methods use it
        convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        masks = apb_sparse.magnitude_masks(model, sparsity, scope="global", layers=convs)
    else:
        raise ValueError(f"mask {mask!r}: expected local@S or global@S")
    masked = apb_sparse.apply_masks(model, masks)
    bns = [m for m in masked.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    masked.train()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _ in range(8):
            masked(torch.rand(32, 3, 32, 32, generator=g))
    for m in bns:
        m.momentum = 0.1
    return masked.eval()


def nonzero_macs(model, x) -> tuple:
    """(dense, nonzero) multiply-adds of the conv / linear layers of a dense model on input x."""
    import torch

    tot = {"dense": 0, "nz": 0}

    def hook(mod, args, out):
        w = mod.weight
        per_out = out.numel() // out.shape[1] if isinstance(mod, torch.nn.Conv2d) else out.numel() // out.shape[-1]
        tot["dense"] += w.numel() * per_out
        tot["nz"] += int((w != 0).sum()) * per_out

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.inference_mode():
        model(x)
    for h in hs:
        h.remove()
    return tot["dense"], tot["nz"]


def export_onnx(dense_folded, x, path: str):
    import torch

    kw = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    with torch.no_grad():
        torch.onnx.export(dense_folded, (x,), path, input_names=["input"], output_names=["output"], opset_version=17,
                          do_constant_folding=True, **kw)


def run_case(case: dict, workers: dict, args, tmp: str) -> dict:
    import numpy as np
    import torch

    import apb_sparse

    arch, mask, batch = case["arch"], case["mask"], case["batch"]
    masked = build_case(arch, mask, args.width)
    g = torch.Generator().manual_seed(123)
    x = torch.rand(batch, 3, 32, 32, generator=g)
    dense = apb_sparse.densify(masked).eval()
    folded = apb_sparse.fuse.fold_batchnorm(dense)
    with torch.inference_mode():
        ref = dense(x)
    dense_macs, nz_macs = nonzero_macs(folded, x)
    tag = f"{arch}_{mask.replace('@', '')}_b{batch}"
    paths = {"model": os.path.join(tmp, tag + ".pt"), "input": os.path.join(tmp, tag + "_x.npy"),
             "onnx": os.path.join(tmp, tag + ".onnx")}
    torch.save(masked, paths["model"])
    np.save(paths["input"], x.numpy())
    row = {"arch": arch, "mask": mask, "batch": batch, "dense_macs": dense_macs, "nonzero_macs": nz_macs,
           "limit_ms": 2 * nz_macs / (args.gemm_gflops * 1e9) * 1e3, "engines": {}, "skipped": {}}
    if any(e not in TORCH_ENGINES for e in workers):
        export_onnx(folded, x, paths["onnx"])
    live = {}
    scale = max(1.0, float(ref.abs().max()))
    for engine, w in workers.items():
        r = w.call(cmd="load", onnx=paths["onnx"], model=paths["model"], input=paths["input"],
                   output=os.path.join(tmp, f"{tag}_{engine}_y.npy"), tune=bool(args.tune))
        if not r.get("ok"):
            row["skipped"][engine] = r.get("error")
            print(f"  {engine}: load failed: {r.get('error')}\n{r.get('trace', '')}", flush=True)
            continue
        y = torch.from_numpy(np.load(r["output"]))
        err = float((y - ref).abs().max()) if y.shape == ref.shape else float("inf")
        row["engines"][engine] = {"max_abs_err": err, "load_s": r["load_s"], "note": r.get("note", "")}
        if not err <= args.tolerance * scale:
            row["skipped"][engine] = f"output differs from torch by {err:.3g} (scale {scale:.3g})"
            print(f"  {engine}: {row['skipped'][engine]}; not timed", flush=True)
            continue
        live[engine] = w
    names = list(live)
    times = {e: [] for e in names}
    meter = LoadMeter(w.proc.pid for w in live.values())
    meter.start()
    for rnd in range(args.warmup + args.rounds):
        k = rnd % max(1, len(names))
        for engine in names[k:] + names[:k]:
            r = live[engine].call(cmd="time", min_time=args.min_time)
            if not r.get("ok"):
                raise RuntimeError(f"{engine} failed while timing: {r.get('error')}")
            if rnd >= args.warmup:
                times[engine].append(r["s"])
    row["other_load"] = meter.stop()
    for engine in names:
        ms = [t * 1e3 for t in times[engine]]
        row["engines"][engine].update({"median_ms": statistics.median(ms), "times_ms": ms})
    if args.per_layer:
        for engine in names:
            r = live[engine].call(cmd="profile", iterations=args.profile_iterations)
            if r.get("ok") and r.get("layers"):
                row["engines"][engine]["layers"] = r["layers"]
                if r.get("total_ms") is not None:
                    row["engines"][engine]["profile_total_ms"] = r["total_ms"]
    return row


def format_row(row: dict) -> str:
    e = row["engines"]
    cells = [f"{row['arch']:<9}", f"{row['mask']:<11}", f"b={row['batch']:<3}", f"limit {row['limit_ms']:7.2f} ms",
             f"other load {row.get('other_load', 0):4.0%}"]
    for engine in ENGINES + ("apb_sparse_base",):
        if engine in e and "median_ms" in e[engine]:
            cells.append(f"{engine} {e[engine]['median_ms']:8.2f} ms ({e[engine]['median_ms'] / row['limit_ms']:5.1f}x)")
    ratio = _ratio(row, "apb_sparse", "deepsparse")
    if ratio is not None:
        cells.append(f"apb/deepsparse {ratio:.2f}")
    return "  ".join(cells)


def _ms(row, engine):
    e = row["engines"].get(engine, {})
    return e.get("median_ms")


def _ratio(row, a, b):
    x, y = _ms(row, a), _ms(row, b)
    return None if x is None or y is None else x / y


def markdown_table(data: dict) -> str:
    engines = [e for e in ENGINES + ("apb_sparse_base",) if any(_ms(r, e) is not None for r in data["results"])]
    head = "| model | masks | batch | limit ms |" + "".join(f" {e} ms (x limit) |" for e in engines)
    base = "apb_sparse_base" in engines
    head += " apb / deepsparse | apb speedup over torch |" + (" apb / apb_base |" if base else "") + " other load |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in data["results"]:
        cells = [r["arch"], r["mask"], str(r["batch"]), f"{r['limit_ms']:.2f}"]
        for e in engines:
            ms = _ms(r, e)
            cells.append("-" if ms is None else f"{ms:.2f} ({ms / r['limit_ms']:.1f}x)")
        ratio, sp = _ratio(r, "apb_sparse", "deepsparse"), _ratio(r, "torch", "apb_sparse")
        cells.append("-" if ratio is None else f"{ratio:.2f}")
        cells.append("-" if sp is None else f"{sp:.2f}x")
        if base:
            rb = _ratio(r, "apb_sparse", "apb_sparse_base")
            cells.append("-" if rb is None else f"{rb:.2f}")
        cells.append(f"{r.get('other_load', 0):.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=ENGINES + ("apb_sparse_base",), help=argparse.SUPPRESS)
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--archs", nargs="+", default=["resnet18", "vgg16"])
    p.add_argument("--masks", nargs="+", default=["local@0.9", "local@0.95", "local@0.99"],
                   help="local@S (every layer at sparsity S) or global@S (one threshold over the convs)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--width", type=int, default=None, help="model width option (small models for smoke tests)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-time", type=float, default=0.2, help="per round, repeat calls for at least this long")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest output difference to torch allowed, relative to max(1, max |output|)")
    p.add_argument("--gemm-n", type=int, default=4096, help="matmul size of the GEMM-rate measurement")
    p.add_argument("--per-layer", action="store_true", help="also collect per-layer times (ours, DeepSparse)")
    p.add_argument("--tune", action="store_true",
                   help="deploy with tune=True (layouts chosen by measured time; checkouts without it: the cost model)")
    p.add_argument("--profile-iterations", type=int, default=10)
    p.add_argument("--deepsparse-python", default=DEFAULT_DEEPSPARSE_PYTHON)
    p.add_argument("--onnx-python", default=None,
                   help=f"Python with onnxruntime / openvino (default {DEFAULT_ONNX_PYTHON} if it exists, else this one)")
    p.add_argument("--baseline-root", default=None,
                   help="also time the deployed form of the apb_sparse checkout at this path (built in place), "
                        "as engine apb_sparse_base: an in-run A/B of two kernel versions")
    p.add_argument("--out", default=os.path.join(HERE, "results", "peers.json"))
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.threads)

    import torch

    from apb_sparse.bench import environment

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    args.gemm_gflops = gemm_rate(args.threads, args.gemm_n)
    print(f"GEMM rate ({args.gemm_n}^3 torch matmul, {args.threads} threads): {args.gemm_gflops:.1f} GFLOP/s",
          flush=True)
    workers, versions, skipped = start_workers(args)
    data = {"environment": environment(), "command": "python benchmarks/peers.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "gemm_gflops": args.gemm_gflops, "gemm_n": args.gemm_n, "threads": args.threads, "rounds": args.rounds,
            "min_time_s": args.min_time, "engine_versions": versions, "skipped_engines": skipped, "results": []}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="apb_peers_")
    try:
        for arch in args.archs:
            for mask in args.masks:
                for batch in args.batches:
                    row = run_case({"arch": arch, "mask": mask, "batch": batch}, workers, args, tmp)
                    data["results"].append(row)
                    print(format_row(row), flush=True)
                    with open(args.out, "w") as f:  # after every case: a long run stopped early keeps its cells
                        json.dump(data, f, indent=1)
    finally:
        for w in workers.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(markdown_table(data))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
