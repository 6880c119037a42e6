"""What a check may do to the server it talks to: the write permission.

People point the suite at servers that hold their data (``--uri``).  The
promise "nothing is written without ``--allow-writes``" is not left to each
check's author remembering a marker: every connection a check opens, through
libnbd (:mod:`conformance.handle`) or the raw-wire client
(:mod:`conformance.wire.client`), carries a :class:`WritePermission`, and a
write, trim or write-zeroes request is refused *before a byte of it is sent*
unless the check is marked ``@pytest.mark.writes`` and the target may be
written (the suite started it, or ``--allow-writes`` was given).

The marker is enforced against every target, the bundled reference server
included, so that a check that writes without the marker fails in CI the day
it is written, not on a user's disk.
"""

from __future__ import annotations

import dataclasses
import struct

#: Request types that change the export's contents ("Values / Transmission
#: phase / Request types"): NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES.
#: Written from the spec, not shared with the wire client's enumerations, so
#: that this module stays importable from everywhere without cycles.
WRITE_COMMANDS = {1: "NBD_CMD_WRITE", 4: "NBD_CMD_TRIM", 6: "NBD_CMD_WRITE_ZEROES"}

#: "Protocol phases / Transmission / Request message": the compact request
#: magic, and the extended one of the EXTENDED_HEADERS extension.
_REQUEST_MAGICS = (0x25609513, 0x21E41C71)
# magic (32), command flags (16), type (16)
_REQUEST_HEAD = struct.Struct(">IHH")


class UnmarkedWrite(Exception):
    """A check tried to write without ``@pytest.mark.writes``: a defect of the check.

    Not an AssertionError on purpose: it is never softened into a SHOULD
    warning, and never mistaken for a verdict on the server.
    """


class WritesNotAllowed(Exception):
    """A marked check tried to write to a target that may not be written."""


@dataclasses.dataclass(frozen=True)
class WritePermission:
    """Whether the connections of one check may send requests that change data.

    ``marked``: the check carries ``@pytest.mark.writes``.  ``target_writable``:
    the suite started the server, or the user passed ``--allow-writes``.
    """

    marked: bool = True
    target_writable: bool = True
    check: str = ""

    @property
    def allows_writes(self) -> bool:
        return self.marked and self.target_writable

    def require(self, what: str) -> None:
        """Raise unless a request that changes data (named WHAT) may be sent."""
        if not self.marked:
            raise UnmarkedWrite(
                f"this check writes but is not marked @pytest.mark.writes: refused to send "
                f"{what} (nothing was sent){self._who()}"
            )
        if not self.target_writable:
            raise WritesNotAllowed(
                f"refused to send {what} to a server the suite did not start: pass "
                f"--allow-writes to let checks write to it (nothing was sent){self._who()}"
            )

    def require_for_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Refuse raw transmission-phase bytes that contain a request changing data.

        Raw-wire checks may send hand-made bytes rather than requests built by
        the client; any request magic followed by a write-type command anywhere
        in them counts (a conservative test: a false alarm costs a check, a miss
        costs a user's data).
        """
        if self.allows_writes:
            return
        view = bytes(data)
        for magic in _REQUEST_MAGICS:
            needle = struct.pack(">I", magic)
            at = view.find(needle)
            while at != -1 and at + _REQUEST_HEAD.size <= len(view):
                _, _, command = _REQUEST_HEAD.unpack_from(view, at)
                if command in WRITE_COMMANDS:
                    self.require(f"{WRITE_COMMANDS[command]} (in raw bytes)")
                at = view.find(needle, at + 1)

    def _who(self) -> str:
        return f" [{self.check}]" if self.check else ""


#: For connections made outside any check (unit tests of the clients, probes).
UNRESTRICTED = WritePermission()
#: For the suite's own probes of a target: they never write.
READ_ONLY = WritePermission(marked=False, target_writable=False, check="liveness probe")
