"""Reaching a Ray cluster: whether Ray is installed, and :func:`connect_ray`, a ``ray.init`` bounded
by a timeout that understands token authentication and names the address in its errors."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Tuple


# Seconds to reach a Ray cluster before giving up (Ray's own retries last about 12 minutes).
DEFAULT_RAY_TIMEOUT_S = 60.0


def ray_available() -> bool:
    """True when ``import ray`` works."""
    try:
        import ray  # noqa: F401  (optional: the 'ray' extra)
    except Exception:  # ImportError, or a broken install (e.g. psutil missing)
        return False
    return True


class RayConnectionError(ConnectionError):
    """A Ray cluster that cannot be used: unreachable, not answering, or refusing our token.
    The message names the address and says what to do."""


_TOKEN_HELP = ("copy the head node's token (run `ray get-auth-token` there, or read its ~/.ray/auth_token) "
               "to this machine as ~/.ray/auth_token, or export RAY_AUTH_TOKEN=<token> "
               "(or RAY_AUTH_TOKEN_PATH=<file holding it>)")


def _token_source() -> Optional[str]:
    """Where Ray would read an authentication token from (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token, in Ray's order), or None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH={path}" if Path(path).expanduser().is_file() else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def _enable_token_mode() -> None:
    """Token authentication for this process (and the processes it starts), as ``ray.init``
    does by itself only for ``address="auto"``."""
    try:  # Ray's own switch also refreshes its cached config if Ray already read it
        from ray._private.authentication.authentication_token_setup import _enable_token_auth  # optional (Ray)
        _enable_token_auth()
    except Exception:  # another Ray version: the environment variable is the documented switch
        os.environ["RAY_AUTH_MODE"] = "token"


def _ray_auth(address: str) -> Tuple[str, Optional[str]]:
    """Decide the authentication mode for connecting to ``address``; return (mode, token source).

    RAY_AUTH_MODE set by the user is respected. Unset, token mode is switched on when a token is
    available (a cluster without authentication accepts a token too, measured with Ray 2.60), so
    the README's recipe works without knowing about RAY_AUTH_MODE.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    source = _token_source()
    if mode is None:
        if source is None:
            return "disabled", None
        _enable_token_mode()
        return "token", source
    if mode.lower() == "token" and source is None:
        # Ray itself aborts the process (a failed C++ check) in this state.
        raise RayConnectionError(f"--ray-address {address}: RAY_AUTH_MODE=token is set but no Ray "
                                 f"authentication token was found; {_TOKEN_HELP}")
    return mode.lower(), source


def _split_host_port(address: str, default_port: int) -> Tuple[str, int]:
    hostport = address.split("://", 1)[-1].rstrip("/")
    if hostport.startswith("["):  # [IPv6]:port
        host, _, rest = hostport[1:].partition("]")
        port = rest.lstrip(":")
    elif hostport.count(":") == 1:
        host, port = hostport.split(":")
    else:
        host, port = hostport, ""
    try:
        port_n = int(port) if port else default_port
    except ValueError:
        raise RayConnectionError(f"--ray-address {address!r}: expected HOST:PORT (e.g. 10.0.0.1:6379), "
                                 f"'auto' or ray://HOST:10001") from None
    if not host or not 0 < port_n < 65536:
        raise RayConnectionError(f"--ray-address {address!r}: expected HOST:PORT (e.g. 10.0.0.1:6379), "
                                 f"'auto' or ray://HOST:10001")
    return host, port_n


def _probe_tcp(address: str, host: str, port: int, deadline: float, timeout_s: float) -> None:
    """Open a TCP connection to host:port, retrying until ``deadline`` (a head that is still
    starting); pure Python with short waits, so Ctrl-C stops it at once."""
    last = "no attempt"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RayConnectionError(
                f"no Ray cluster reachable at {address} within {timeout_s:g} s (--ray-timeout): connecting to "
                f"{host}:{port} failed ({last}). Is the head running (`ray start --head --port={port}`), is the "
                "address the head's IP and GCS port, and does the firewall let this machine reach it?")
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(left, 0.05))):
                return
        except OSError as e:
            last = e.strerror or type(e).__name__
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))


# Run in a child process: the C++ GCS client blocks for ~35 s per attempt on a port that does not
# answer and ignores Ctrl-C meanwhile; a child can be abandoned at the deadline.
_GCS_PROBE = """
import sys
try:
    from ray._raylet import GcsClient
    GcsClient(address=sys.argv[1]).cluster_id
except Exception as e:
    kind = "auth" if type(e).__name__ == "AuthenticationError" else "error"
    print(kind + ":" + type(e).__name__ + ": " + " ".join(str(e).split())[:400], flush=True)
    sys.exit(3)
print("ok", flush=True)
"""


def _probe_gcs(address: str, target: str, deadline: float, timeout_s: float, mode: str,
               source: Optional[str]) -> None:
    """Ask the GCS at ``target`` for its cluster id (what ``ray.init`` does first), in a child
    process bounded by ``deadline``; turn a refused token into instructions."""
    left = max(deadline - time.monotonic(), 1.0)
    proc = subprocess.Popen([sys.executable, "-c", _GCS_PROBE, target], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=left)
    except subprocess.TimeoutExpired:
        raise RayConnectionError(
            f"the Ray cluster at {address} did not answer within {timeout_s:g} s (--ray-timeout): "
            f"{target} accepts TCP connections but no Ray GCS replied. Is it the head's GCS port "
            "(6379 unless `ray start --head --port` said otherwise; not the dashboard's 8265 or the "
            "client server's 10001, which needs ray://HOST:10001)?") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    line = (out or "").strip().splitlines()[-1:] or [""]
    line = line[0]
    if proc.returncode == 0 and line == "ok":
        return
    if line.startswith("auth:"):
        if mode != "token":
            raise RayConnectionError(
                f"the Ray cluster at {address} requires token authentication (Ray >= 2.5x turns it on with "
                f"`ray start --head`) and this machine has no token"
                f"{' (RAY_AUTH_MODE=' + mode + ' is set)' if os.environ.get('RAY_AUTH_MODE') else ''}: "
                f"{_TOKEN_HELP}; then rerun")
        raise RayConnectionError(
            f"the Ray cluster at {address} refused the authentication token from {source}: it is not the "
            f"token the head was started with; {_TOKEN_HELP}")
    detail = line.split(":", 1)[-1].strip() or f"exit code {proc.returncode}"
    raise RayConnectionError(f"cannot connect to the Ray cluster at {address}: {detail}")


@contextlib.contextmanager
def _ray_env(overrides: Dict[str, str]):
    old = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def connect_ray(address: str, *, timeout_s: float = DEFAULT_RAY_TIMEOUT_S, **init_kwargs) -> str:
    """``ray.init(address=...)`` that fails within ``timeout_s`` with a message naming the address.

    Steps, all bounded by one deadline and interruptible with Ctrl-C: resolve ``"auto"`` (the
    cluster ``ray start`` left on this machine); decide token authentication (:func:`_ray_auth`);
    open a TCP connection to the head; ask its GCS for the cluster id in a child process (a refused
    token gives instructions instead of Ray's retries); then ``ray.init``.

    Args:
        address: ``"HOST:PORT"`` (the head's GCS port, 6379 by default), ``"auto"`` or
            ``"ray://HOST:10001"`` (Ray Client; only the TCP step is checked).
        timeout_s: seconds for all of it.
        **init_kwargs: passed to ``ray.init``.

    Returns:
        The address connected to.

    Raises:
        RayConnectionError: unreachable, not a Ray GCS, or authentication refused.
    """
    import ray  # optional (the 'ray' extra): imported on use

    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    deadline = time.monotonic() + timeout_s
    target = address
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die  # optional (Ray)
            target = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as e:
            raise RayConnectionError(f"--ray-address auto: {e} (start one with `ray start --head`, or pass "
                                     "--ray-address HEAD_IP:6379)") from None
        except ImportError:  # pragma: no cover - another Ray version: let ray.init resolve it
            target = address
    mode, source = _ray_auth(address)
    client = target.startswith("ray://")
    if target != "auto":
        host, port = _split_host_port(target, 10001 if client else 6379)
        _probe_tcp(address, host, port, deadline, timeout_s)
        if not client:
            _probe_gcs(address, target, deadline, timeout_s, mode, source)
    # The probes passed, so ray.init should connect at once; bound its own retry loop too (one
    # attempt per second) in case the head goes away in between.
    left = max(int(deadline - time.monotonic()), 1)
    with _ray_env({"RAY_gcs_server_port_wait_time_s": str(left)}):
        try:
            ray.init(address=target, **init_kwargs)
        except ConnectionError as e:
            raise RayConnectionError(f"cannot connect to the Ray cluster at {address}: {e}") from None
    return target
