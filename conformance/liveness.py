"""Is the target still there?  The probe, and the record of a target that is gone.

Against a server the suite did not start (``--uri``) one dead or wedged
server must not turn into a pile of unrelated failures, each waiting for its
own timeout.  After every check the plugin probes the target
(:func:`probe`): a fresh connection, the handshake and a one-byte read, each
with a short deadline.  When the probe fails, the check that was running is
named in a :class:`GoneRecord`, written to a file that every xdist worker
reads before each check; the remaining checks are then reported as not run
because the server is gone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

#: Seconds the probe gives the target to accept, greet, negotiate and answer.
PROBE_TIMEOUT = 5.0
#: Seconds during which a refused connection is retried (a server busy closing
#: the check's own connections may refuse for a moment).
REFUSED_GRACE = 3.0


@dataclasses.dataclass(frozen=True)
class GoneRecord:
    """The target stopped answering during CHECK, for REASON."""

    check: str
    reason: str
    worker: str = ""

    def describe(self) -> str:
        where = f" (on worker {self.worker}; checks on other workers ran beside it)"
        return (
            f"the server stopped answering during {self.check}"
            f"{where if self.worker else ''}: {self.reason}"
        )


class GoneState:
    """The shared record of a gone target: a small JSON file, first writer wins."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> GoneRecord | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return GoneRecord(**data)

    def record(self, gone: GoneRecord) -> GoneRecord:
        """Write GONE unless another worker already did; return the record that stands."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return self.read() or gone
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(gone), f)
        return gone


def probe(server: Any, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when SERVER serves a fresh client; otherwise what went wrong.

    The probe never writes (the server's permission is read-only) and reads
    one block at offset 0; an error reply still counts as an answer.
    """
    import nbd

    from conformance.guard import READ_ONLY
    from conformance.handle import ServerTimeout, close_handle, open_handle

    deadline = time.monotonic() + REFUSED_GRACE
    while True:
        try:
            h = open_handle(
                server.target,
                permission=READ_ONLY,
                handle_name="conformance-probe",
                timeout=timeout,
                command_timeout=timeout,
            )
            break
        except ServerTimeout as err:
            return f"it accepts connections but does not negotiate ({err})"
        except nbd.Error as err:
            if time.monotonic() >= deadline:
                return f"a new connection fails: {err.string}"
            time.sleep(0.1)
    try:
        try:
            size = h.get_size()
            minimum = h.get_block_size(nbd.SIZE_MINIMUM) or 1
            if size >= minimum:
                h.pread(minimum, 0)
        except ServerTimeout as err:
            return f"it negotiates but does not answer a read ({err})"
        except nbd.Error:
            pass  # an error reply is an answer
        return None
    finally:
        close_handle(h)


class ServerCrashed(Exception):
    """A server the suite started for a check ended during it (a finding in itself).

    Not an AssertionError: a crash is never softened into a SHOULD warning.
    """


class TargetGone(Exception):
    """The target stopped answering during the check that raises it."""
