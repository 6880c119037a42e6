"""The storage interface every backend implements (nbdkit's plugin split).

Backends know storage, not the protocol: they never build replies and never
validate requests.  The protocol layer checks bounds, flags and permissions
first, then calls a backend; a backend reports trouble by raising OSError,
which the protocol layer maps to an NBD error ("Values / Transmission phase /
Error values").
"""

from __future__ import annotations

import abc
from typing import NamedTuple

from ..protocol.constants import StateFlag

_HOLE = StateFlag.HOLE.value


class Extent(NamedTuple):
    """A run of bytes with one base:allocation status."""

    length: int
    flags: int  # StateFlag bits as a plain int: IntFlag arithmetic is slow per request


class FileRegion(NamedTuple):
    """Bytes of an open file, sent from the page cache (``os.sendfile``) without a copy."""

    fd: int
    offset: int
    length: int


#: What a reply can carry a read's data as: memory, or a region of a file.
ReadPart = bytes | bytearray | memoryview | FileRegion


class Backend(abc.ABC):
    """A fixed-size byte array that may be shared by many connections.

    One backend object serves every connection to its export, so anything
    one connection writes is what every other connection reads: there is no
    per-connection cache, which is what makes NBD_FLAG_CAN_MULTI_CONN true.
    """

    #: Export size in bytes.
    size: int
    #: True when calls block on I/O and should run outside the event loop.
    blocking: bool = False
    #: Whether ``zero(..., fast=True)`` can ever succeed.
    can_fast_zero: bool = True

    @abc.abstractmethod
    def pread(self, length: int, offset: int) -> bytes | bytearray | memoryview:
        """Return exactly ``length`` bytes from ``offset``."""

    def pread_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` from ``offset``: lets a reply be built in one buffer."""
        view[:] = self.pread(len(view), offset)

    def read_parts(self, length: int, offset: int) -> list[ReadPart] | None:
        """A range as parts a reply can carry as they are: views of the backend's
        memory, or regions of its file (the socket writer sends them without
        copying).  None when the backend cannot (the data is then read into
        the reply with :meth:`pread_into`).

        The parts are read when they are sent, not now: a write that lands in
        between shows in them, as if the two requests had run in the other
        order ("The server MAY process commands out of order").
        """
        return None

    @abc.abstractmethod
    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
        """Write ``data``; with ``fua`` it is durable before returning."""

    def write_view(self, length: int, offset: int) -> memoryview | None:
        """Where a write of ``length`` bytes at ``offset`` may be received in place.

        A writable view of the store itself, or None when the backend has none
        (the payload is then received into a buffer and given to
        :meth:`pwrite`).  Only asked for a validated NBD_CMD_WRITE: the
        transport receives the payload into the view as it arrives, then calls
        :meth:`commit_write`.  So its bytes land before the write completes:
        a read sent meanwhile may show some of them, and a write cut off
        mid-payload (its client gone) leaves the part that arrived.  Neither
        breaks a promise: the write was never completed, and "The server MAY
        process commands out of order" ("Ordering of messages and writes").
        A backend that offers a view must never block on it: the socket is
        read into it on the event loop.
        """
        return None

    def commit_write(self, length: int, offset: int, fua: bool) -> None:
        """The payload of a write received into :meth:`write_view` has all arrived.

        The bytes are in place; what remains is bookkeeping and, with
        ``fua``, making them durable.  Also called for the part that arrived
        of a write cut off mid-payload (with ``fua`` false).
        """
        if fua:
            self.flush()

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every completed write durable."""

    @abc.abstractmethod
    def trim(self, length: int, offset: int, fua: bool) -> None:
        """Discard a range (a hint: contents afterwards are unspecified)."""

    @abc.abstractmethod
    def zero(self, length: int, offset: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        """Make a range read as zeroes.

        ``may_trim`` false means NBD_CMD_FLAG_NO_HOLE: keep it allocated.
        ``fast`` means NBD_CMD_FLAG_FAST_ZERO: raise OSError(ENOTSUP) at once,
        changing nothing, unless zeroing is cheaper than writing.
        """

    @abc.abstractmethod
    def extents(self, length: int, offset: int) -> list[Extent]:
        """Allocation status from ``offset``, covering at least one byte."""

    def next_data(self, offset: int) -> int:
        """Where data (NBD_STATE_HOLE clear) next begins from ``offset``; ``size`` if nowhere.

        What SEEK_DATA answers, for x-reference:next-data.  The default walks
        :meth:`extents`.
        """
        while offset < self.size:
            for extent in self.extents(self.size - offset, offset):
                if not extent.flags & _HOLE:
                    return offset
                offset += extent.length
        return self.size

    def read_extents(self, length: int, offset: int) -> list[Extent]:
        """Extents good enough to send zeroes of a read as OFFSET_HOLE chunks.

        Called for every structured read, so it must be cheap; it may be
        coarser than :meth:`extents` (reporting data where a hole is merely
        allowed).  The default is :meth:`extents`.
        """
        return self.extents(length, offset)

    def cache(self, length: int, offset: int) -> None:  # noqa: B027 - optional hook
        """Prefetch a range; the default does nothing, which the spec allows."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; flushed data stays durable."""
