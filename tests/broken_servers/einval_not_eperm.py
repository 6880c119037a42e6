"""A BROKEN reference server: answers NBD_EINVAL where NBD_EPERM is due.

"Values / Transmission phase / Error values": a server SHOULD return NBD_EPERM
for a write or trim request on a read-only export (and "Request types": for a
write zeroes request too).  This one still refuses them, and so keeps the MUST
of NBD_FLAG_READ_ONLY, but with NBD_EINVAL.  For the project's own tests only
(tests/test_suite_can_fail.py).

    einval_not_eperm.py [reference server options...]
"""

from __future__ import annotations

import sys

from patched_server import import_reference_server, serve_with


def main() -> int:
    import_reference_server()
    from reference_server import connection
    from reference_server.protocol.constants import Errno
    from reference_server.protocol.transmission import RequestRejected, Transmission
    from reference_server.protocol.wire import RequestHeader

    class EinvalTransmission(Transmission):
        def validate(self, request: RequestHeader, payload_length: int) -> RequestRejected | None:
            rejected = super().validate(request, payload_length)
            if rejected is not None and rejected.error == Errno.EPERM:
                return RequestRejected(Errno.EINVAL, rejected.message)
            return rejected

    return serve_with(connection, "Transmission", EinvalTransmission, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
