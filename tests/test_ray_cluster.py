"""``apb run`` against a real, token-authenticated Ray head: the docs' cluster recipe run as written,
clear errors (no token, wrong token, dead address, a port that is not Ray) within --ray-timeout,
and Ctrl-C that stops a driver blocked in Ray's native code.

The head is started by the recipe's own `ray start` line on 127.0.0.1 (a free port instead of
6379), with HOME and RAY_TMPDIR in a temporary folder so the user's ~/.ray is untouched; every
process it spawns carries a marker variable, and the test stops exactly those processes by pid.
Skipped when Ray is not installed.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("ray")

from apb_sparse.bench.results import read_records  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cluster.md"
APB = [sys.executable, "-m", "apb_sparse.cli"]


def _recipe() -> list[str]:
    """The command lines of the docs' ray-cluster recipe block."""
    text = DOCS.read_text()
    m = re.search(r"<!-- recipe: ray-cluster.*?-->\s*```bash\n(.*?)```", text, re.S)
    assert m, f"no ray-cluster recipe in {DOCS}"
    return [ln.strip() for ln in m.group(1).splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (those this test started, and their children)."""
    pids = []
    needle = marker.encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes():
                pids.append(int(d.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def _stop(marker: str, timeout: float = 20.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _marked_pids(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while _marked_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _marked_pids(marker):
            return


@pytest.fixture(scope="module")
def head():
    """The recipe's head, started as the docs say; yields (env, lines, port)."""
    root = Path(tempfile.mkdtemp(prefix="apbray", dir="/tmp"))  # short: Ray's socket paths have a limit
    marker = f"APB_TEST_RAY_HEAD={uuid.uuid4().hex}"
    port = _free_port()
    home = root / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_TMPDIR=str(root / "t"), HEAD_IP="127.0.0.1", OUT=str(root / "out"),
               APB_TEST_RAY_HEAD=marker.split("=", 1)[1], PYTHONPATH=str(DOCS.parent.parent))
    (root / "t").mkdir()
    lines = [ln.replace("6379", str(port)) for ln in _recipe()]
    head_lines = [ln for ln in lines if not ln.startswith("apb ") and "--address=" not in ln]
    assert len(head_lines) == 2 and "--head" in head_lines[1], head_lines
    try:
        for ln in head_lines:
            r = subprocess.run(["bash", "-c", ln], env=env, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, (ln, r.stdout[-2000:], r.stderr[-2000:])
        assert (home / ".ray" / "auth_token").is_file()
        yield env, lines, port, root
    finally:
        _stop(marker)
        leftover = _marked_pids(marker)
        shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"Ray processes left running: {leftover}"


def _apb_line(lines: list[str], needle: str) -> str:
    found = [ln for ln in lines if ln.startswith("apb ") and needle in ln]
    assert len(found) == 1, lines
    return found[0]


def test_the_docs_recipe_runs_a_grid_through_a_token_authenticated_head(head):
    env, lines, port, root = head
    smoke = _apb_line(lines, "--out $OUT/smoke")
    assert "RAY_AUTH_MODE" not in env and "RAY_AUTH_MODE" not in smoke  # the driver is told nothing
    r = subprocess.run(["bash", "-c", smoke], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    records = read_records(root / "out" / "smoke" / "results.jsonl", warn=False)
    assert {"dense", "random"} <= {r["method"] for r in records}
    assert all(r["config"]["executor"] == "ray" for r in records)
    assert "ray executor" in r.stdout + r.stderr or "(ray executor)" in r.stdout


def _apb_fail(args, env, timeout):
    t0 = time.monotonic()
    r = subprocess.run(APB + args, env=env, capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


def test_driver_without_the_token_is_told_what_to_copy(head, tmp_path):
    env, lines, port, root = head
    env = dict(env, HOME=str(tmp_path))  # no ~/.ray/auth_token here
    r, secs = _apb_fail(["run", "--executor", "ray", "--ray-address", f"127.0.0.1:{port}", "--out",
                         str(tmp_path / "o"), "-q", "--no-plots"], env, 120)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("apb: error:") and f"127.0.0.1:{port}" in err
    assert "requires token authentication" in err and "RAY_AUTH_TOKEN" in err and "auth_token" in err
    # a wrong token is named as such
    r, _ = _apb_fail(["run", "--executor", "ray", "--ray-address", f"127.0.0.1:{port}", "--out",
                      str(tmp_path / "o"), "-q"], dict(env, RAY_AUTH_TOKEN="0" * 64), 120)
    assert r.returncode == 2 and "refused the authentication token from RAY_AUTH_TOKEN" in r.stderr
    # the right token in the environment (no file) works for the connection: a grid with no cells
    token = (Path(env["OUT"]).parent / "home" / ".ray" / "auth_token").read_text().strip()
    r, _ = _apb_fail(["run", "--executor", "ray", "--ray-address", f"127.0.0.1:{port}", "--methods", "random",
                      "--sparsities", "0.9", "--seeds", "0", "--out", str(Path(env["OUT"]) / "smoke"), "-q",
                      "--no-plots", "--no-latency", "--base-epochs", "1", "--aa-samples", "16", "--fmn-samples", "8"],
                     dict(env, RAY_AUTH_TOKEN=token), 300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"ran 0 cells \(ray executor\), skipped [1-9]\d* already finished", r.stdout), r.stdout[-2000:]


def test_dead_address_fails_within_the_timeout(tmp_path):
    port = _free_port()  # nothing listens there
    r, secs = _apb_fail(["run", "--executor", "ray", "--ray-address", f"127.0.0.1:{port}", "--ray-timeout", "3",
                         "--out", str(tmp_path / "never"), "-q"], dict(os.environ), 120)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("apb: error: no Ray cluster reachable at 127.0.0.1:") and "within 3 s" in err
    assert secs < 3 + 30  # the timeout plus the interpreter's start (imports take ~5-10 s on 2 busy cores)
    assert not (tmp_path / "never" / "results.jsonl").exists()


class _SilentServer:
    """Accepts TCP connections and never answers (a port that is not a Ray GCS)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_port_that_is_not_ray_fails_within_the_timeout(tmp_path):
    srv = _SilentServer()
    try:
        r, secs = _apb_fail(["run", "--executor", "ray", "--ray-address", f"127.0.0.1:{srv.port}",
                             "--ray-timeout", "4", "--out", str(tmp_path / "never"), "-q"], dict(os.environ), 120)
    finally:
        srv.close()
    assert r.returncode == 2
    assert f"127.0.0.1:{srv.port} did not answer within 4 s" in r.stderr


def test_ctrl_c_stops_a_driver_blocked_in_ray_native_code(tmp_path):
    """ray.init on a silent port blocks in C++ for ~35 s per attempt; Ctrl-C must still end the
    driver: here the connection is made directly (no probe) under apb's interrupt guard."""
    srv = _SilentServer()
    code = (
        "import ray, sys\n"
        "from apb_sparse.bench.executors import interrupt_guard\n"
        "with interrupt_guard(grace_s=3):\n"
        "    print('connecting', flush=True)\n"
        f"    ray.init(address='127.0.0.1:{srv.port}', include_dashboard=False, logging_level='ERROR')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    try:
        assert proc.stdout.readline().strip() == "connecting"
        time.sleep(3)  # inside ray.init's native connect
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        stopped = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        srv.close()
    assert rc == 130, proc.stderr.read()[-2000:]
    assert stopped < 3 + 5
    assert "did not stop within 3 s of Ctrl-C" in proc.stderr.read()
