"""A BROKEN reference server: advertises NBD_FLAG_CAN_MULTI_CONN under a connection limit of 1.

The flag invites clients to open several connections ("In the absence of this
flag, clients SHOULD NOT multiplex their commands over more than one
connection"), so a server that admits only one must not set it.  For the
project's own tests only (tests/test_suite_can_fail.py).

    multi_conn_single_connection.py MODE [reference server options...]

``read-only``  MULTI_CONN on every read-only export, whatever ``-e`` says:
               qemu-nbd's ``-r`` without ``-e`` regression.
``always``     MULTI_CONN on every export.
"""

from __future__ import annotations

import sys

from patched_server import import_reference_server, mode_argument, serve_with

MODES = ("read-only", "always")


def main() -> int:
    mode = mode_argument(MODES)
    if mode is None:
        return 2
    import_reference_server()
    from reference_server import export_spec
    from reference_server.protocol.constants import TransmissionFlag
    from reference_server.protocol.export import ExportInfo

    class MultiConnExportInfo(ExportInfo):
        __slots__ = ()

        def transmission_flags(self, structured_replies: bool) -> TransmissionFlag:
            flags = super().transmission_flags(structured_replies)
            if mode == "always" or self.read_only:
                flags |= TransmissionFlag.CAN_MULTI_CONN
            return flags

    # The name export_spec.export_info builds every export with.
    return serve_with(export_spec, "ExportInfo", MultiConnExportInfo, sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
