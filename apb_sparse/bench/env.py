"""Environment metadata recorded with every benchmark result."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

from .. import ops


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def environment() -> dict:
    """torch / CUDA versions, CPU and GPU names, threads, ISA path, git commit, time."""
    env = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "apb_sparse_kernel": "unavailable",
    }
    if ops.available():
        # The build the kernel dispatches to on this CPU (AVX-512, AVX2+FMA or portable).
        env["apb_sparse_kernel"] = {"avx512": "avx512", "avx2": "avx2+fma"}.get(ops.kernel_options()["isa"], "portable")
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env
