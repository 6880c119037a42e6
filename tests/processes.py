"""Child processes of the end-to-end tests: started to die with us, stopped by PID."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a server child (preexec_fn): SIGTERM when the test process dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate, wait with a timeout, then kill: never leave a process behind."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def wait_until(condition: Callable[[], bool], what: str, deadline: float = 10.0) -> float:
    """Poll CONDITION until it holds, for at most DEADLINE seconds; return the time it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > deadline:
            raise AssertionError(f"timed out after {deadline} s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - start
