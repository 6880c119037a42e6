"""A BROKEN reference server: each connection sees the export through its own cache.

Yet it advertises NBD_FLAG_CAN_MULTI_CONN whenever the reference server does
(``-e`` other than 1), which breaks the promise of "Values / Handshake phase /
Flag fields / Transmission flags": the effects of NBD_CMD_FLUSH and
NBD_CMD_FLAG_FUA MUST be visible across all connections.  For the project's
own tests only (tests/test_suite_can_fail.py); never an option of the server.

    per_connection_cache.py MODE [reference server options...]

MODE is the cache's bug:

``write-back-at-disconnect``
    writes, trims and write-zeroes stay in the connection's cache; FLUSH and
    FUA do nothing; the cache reaches the shared export only when the
    connection ends.
``flush-writes-back-own``
    FLUSH (and FUA) write back only the cache of the connection that sent
    them, not the other connections' caches.
``stale-read-cache``
    writes go straight to the shared export, but a connection keeps the pages
    it has read and serves them again until it writes them itself (the qemu
    iotest nbd-multiconn scenario: a reader that read the old data first).
"""

from __future__ import annotations

import sys

from patched_server import import_reference_server, mode_argument, serve_with

PAGE = 4096
MODES = ("write-back-at-disconnect", "flush-writes-back-own", "stale-read-cache")


def main() -> int:
    mode = mode_argument(MODES)
    if mode is None:
        return 2
    import_reference_server()
    from reference_server import server
    from reference_server.backends.base import Backend, Extent
    from reference_server.connection import Connection
    from reference_server.protocol.constants import StateFlag

    class CachedView(Backend):
        """One connection's view of the shared backend, through a page cache."""

        def __init__(self, shared: Backend) -> None:
            self.shared = shared
            self.size = shared.size
            self.can_fast_zero = shared.can_fast_zero
            self.dirty: dict[int, bytearray] = {}  # written, not yet written back
            self.clean: dict[int, bytes] = {}  # read, kept (stale-read-cache)

        def _page(self, index: int) -> bytes | bytearray:
            if index in self.dirty:
                return self.dirty[index]
            if index in self.clean:
                return self.clean[index]
            start = index * PAGE
            page = bytes(self.shared.pread(min(PAGE, self.size - start), start))
            if mode == "stale-read-cache":
                self.clean[index] = page
            return page

        def _pieces(self, length: int, offset: int) -> list[tuple[int, int, int, int]]:
            """(page index, start in page, end in page, position in the request)."""
            pieces, pos = [], 0
            while pos < length:
                index, lo = divmod(offset + pos, PAGE)
                n = min(PAGE - lo, length - pos)
                pieces.append((index, lo, lo + n, pos))
                pos += n
            return pieces

        def pread(self, length: int, offset: int) -> bytearray:
            out = bytearray(length)
            for index, lo, hi, pos in self._pieces(length, offset):
                out[pos : pos + hi - lo] = self._page(index)[lo:hi]
            return out

        def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
            src = memoryview(data).cast("B")
            if mode == "stale-read-cache":
                self.shared.pwrite(src, offset, fua)
                for index, _, _, _ in self._pieces(len(src), offset):
                    self.clean.pop(index, None)  # its own writes only
                return
            touched = []
            for index, lo, hi, pos in self._pieces(len(src), offset):
                page = self.dirty.get(index)
                if page is None:
                    page = self.dirty[index] = bytearray(self._page(index))
                page[lo:hi] = src[pos : pos + hi - lo]
                touched.append(index)
            if fua and mode == "flush-writes-back-own":
                self._write_back(touched)

        def _write_back(self, indices: list[int] | None = None) -> None:
            for index in list(self.dirty if indices is None else indices):
                self.shared.pwrite(self.dirty.pop(index), index * PAGE, False)

        def flush(self) -> None:
            if mode == "flush-writes-back-own":
                self._write_back()

        def trim(self, length: int, offset: int, fua: bool) -> None:
            self.pwrite(bytes(length), offset, fua)

        def zero(self, length: int, offset: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
            self.pwrite(bytes(length), offset, fua)

        def extents(self, length: int, offset: int) -> list[Extent]:
            # Cached pages are reported as data (always a truthful status), so
            # that structured reads do not skip them as holes.
            first, last = offset // PAGE, (offset + length - 1) // PAGE
            if any(first <= i <= last for i in (*self.dirty, *self.clean)):
                return [Extent(min(length, self.size - offset), StateFlag(0))]
            return self.shared.extents(length, offset)

        def read_extents(self, length: int, offset: int) -> list[Extent]:
            return self.extents(length, offset)

        def close_connection(self) -> None:
            self._write_back()

    class CachingConnection(Connection):
        """Gets its own CachedView where the reference server hands out the shared backend."""

        @property
        def backend(self) -> Backend | None:
            return self._view

        @backend.setter
        def backend(self, shared: Backend | None) -> None:
            self._view = None if shared is None else CachedView(shared)

        def connection_lost(self, exc: Exception | None) -> None:
            if isinstance(self._view, CachedView):
                self._view.close_connection()
            super().connection_lost(exc)

    return serve_with(server, "Connection", CachingConnection, sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
