"""Ctrl-C that stops the ``apb run`` driver even while it is blocked in native code
(:func:`interrupt_guard`)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from typing import Iterator, Optional


@contextlib.contextmanager
def interrupt_guard(grace_s: float = 10.0, *, message: str = "apb: interrupted") -> Iterator[None]:
    """Make Ctrl-C stop this process even while it is blocked in native code.

    Python runs its SIGINT handler (``KeyboardInterrupt``) only between bytecodes of the main
    thread, so a driver blocked in a C++ call (Ray's GCS client waits ~35 s per attempt) does not
    react.  The C-level handler does write the signal number to the wakeup fd at once, though: a
    watcher thread reading it forces the exit (code 130) when a second Ctrl-C comes, or when the
    process is still alive ``grace_s`` seconds after the first one.  The first Ctrl-C still raises
    ``KeyboardInterrupt`` as usual, so normal cleanup (cancelling tasks, keeping finished results)
    happens whenever the main thread can run.

    Does nothing outside the main thread or when Python's SIGINT handler is not the default one.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    rfd, wfd = socket.socketpair()
    rfd.setblocking(True)
    wfd.setblocking(False)
    try:
        old = signal.set_wakeup_fd(wfd.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):  # pragma: no cover
        rfd.close()
        wfd.close()
        yield
        return
    stop = threading.Event()

    def watch() -> None:
        first: Optional[float] = None
        rfd.settimeout(0.5)
        while not stop.is_set():
            try:
                data = rfd.recv(64)
            except socket.timeout:
                data = b""
            except OSError:
                return
            if stop.is_set():
                return
            if signal.SIGINT in data:
                if first is not None:
                    _force_exit(f"{message} (second Ctrl-C)")
                first = time.monotonic()
            if first is not None and time.monotonic() - first > grace_s:
                _force_exit(f"{message} (the driver did not stop within {grace_s:g} s of Ctrl-C)")

    watcher = threading.Thread(target=watch, name="apb-interrupt-guard", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        signal.set_wakeup_fd(old)
        watcher.join(timeout=2)
        rfd.close()
        wfd.close()


def _force_exit(message: str) -> None:
    try:
        sys.stderr.write(f"\n{message}; finished cells are kept, rerun the same command to resume\n")
        sys.stderr.flush()
    finally:
        os._exit(130)
