"""A BROKEN reference server: 512-byte alignment for clients that never agreed to it.

"Size constraints": "If size constraints have not been advertised or agreed
on externally, then a server SHOULD support a default minimum block size of
1".  This one advertises nothing and refuses every READ and WRITE that is not
aligned to 512 bytes with NBD_EINVAL, as a server built on a 512-byte sector
device without a read-modify-write path would.  For the project's own tests
only (tests/test_suite_can_fail.py).

    aligned_by_default.py [reference server options...]
"""

from __future__ import annotations

import sys

from patched_server import import_reference_server, serve_with

SECTOR = 512


def main() -> int:
    import_reference_server()
    from reference_server import connection
    from reference_server.protocol.constants import Command, Errno
    from reference_server.protocol.transmission import RequestRejected, Transmission
    from reference_server.protocol.wire import RequestHeader

    class SectorTransmission(Transmission):
        def validate(self, request: RequestHeader, payload_length: int) -> RequestRejected | None:
            unaligned = (request.offset | request.length) % SECTOR
            if request.command in (Command.READ, Command.WRITE) and unaligned:
                return RequestRejected(Errno.EINVAL, "not aligned to 512 bytes")
            return super().validate(request, payload_length)

    return serve_with(connection, "Transmission", SectorTransmission, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
