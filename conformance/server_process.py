"""The process of a server the suite started: whether it still runs, and how it ended.

Checks of a server's shutdown (SIGTERM with clients connected, "Protocol
phases / Transmission / Terminating the transmission phase") signal the
server's process and watch it go.  Only a server the suite started has a
process the check may signal; against any other the check is unsupported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from conformance.spec import unsupported


def alive(pid: int) -> bool:
    """True while *pid* runs (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def server_process(server: Any) -> tuple[int, Callable[[], int | None]]:
    """(pid, exit-status getter) of the server the suite started, else UNSUPPORTED."""
    process = getattr(server, "process", None)
    daemon = getattr(server, "daemon_pid", None)
    if daemon is not None and alive(daemon):
        return daemon, lambda: None  # not our child: its exit status is not ours to read
    if process is None or process.poll() is not None:
        unsupported("the suite does not hold the server's process (not started by the suite)")
    assert process is not None
    return process.pid, process.poll
