"""A BROKEN reference server: NBD_CMD_FLAG_FAST_ZERO takes the slow path.

"Values / Transmission phase / Request types / NBD_CMD_WRITE_ZEROES": with
NBD_CMD_FLAG_FAST_ZERO the server "MUST fail quickly with NBD_ENOTSUP unless
the request can be serviced in less time than a corresponding NBD_CMD_WRITE".
This one zeroes as a server writing zeroes to a slow disk would: 0.3 s a
request, far longer than a WRITE of the range over a local socket.  For the
project's own tests only (tests/test_suite_can_fail.py).

    slow_fast_zero.py MODE [reference server options...]

``slow-success``  the fast zero succeeds, slowly (the flag ignored).
``slow-failure``  the fast zero fails with NBD_ENOTSUP, but only after trying
                  the slow way (not "quickly").
"""

from __future__ import annotations

import errno
import sys
import time

from patched_server import import_reference_server, mode_argument, serve_with

MODES = ("slow-success", "slow-failure")
SLOW_PATH = 0.3  # seconds


def main() -> int:
    mode = mode_argument(MODES)
    if mode is None:
        return 2
    import_reference_server()
    from reference_server import cli
    from reference_server.backends import MemoryBackend

    class SlowZeroBackend(MemoryBackend):
        def zero(self, length: int, offset: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
            if fast:
                time.sleep(SLOW_PATH)  # the slow path: blocks like synchronous disk I/O
                if mode == "slow-failure":
                    raise OSError(errno.ENOTSUP, "zeroing was no faster than writing")
            super().zero(length, offset, may_trim=may_trim, fast=fast, fua=fua)

    # The name cli.open_backend builds every memory export with.
    return serve_with(cli, "MemoryBackend", SlowZeroBackend, sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
