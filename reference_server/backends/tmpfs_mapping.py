"""A shared mapping of a file on tmpfs, into which write payloads are received.

A file on tmpfs is memory: mapping it (MAP_SHARED) makes its page cache
writable in place, so a write's payload can be received from the socket
straight into the file (``Backend.write_view``) instead of into a buffer
that ``pwrite`` then copies.  A disk file never gets one: a page fault there
would wait for the device, on the event loop.

The one danger is a page tmpfs cannot allocate when the payload arrives (the
filesystem is full): a fault the kernel cannot satisfy is a SIGBUS for the
process, or EFAULT for the socket read.  So a range is allocated first
(``fallocate``), where a full tmpfs is a clean ENOSPC and the write takes
the ``pwrite`` path to report it.  Allocation is remembered per 32 KiB chunk
(a 4 KiB write allocates its whole chunk), so that a rewrite costs no system
call; trimming forgets the chunks it touches.  A file truncated underneath
the export can still fault: its size is fixed when the export is opened.

Small reads of allocated chunks are sent from the mapping too (see
``FileBackend.read_parts``): as views, the replies of a pass leave in one
``sendmsg``, where each ``sendfile`` is a system call of its own.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
from collections.abc import Callable

#: Allocation is done and remembered in chunks of this many bytes.
CHUNK = 32 * 1024
# tmpfs allocates, ramfs cannot (it has no size limit to run into either).
_CANNOT_ALLOCATE = (errno.EOPNOTSUPP, errno.ENOSYS)


class TmpfsMapping:
    """The whole file, mapped shared and writable; views of it for write payloads."""

    def __init__(self, fd: int, size: int, allocate: Callable[[int, int], None]) -> None:
        """Map ``size`` bytes of ``fd``; ``allocate(offset, length)`` is fallocate(2).

        Raises OSError (or ValueError, OverflowError) when the file cannot be
        mapped, e.g. beyond the address space.
        """
        self._size = size
        self._allocate = allocate
        self._mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        self._view = memoryview(self._mapping)
        self._allocated: set[int] = set()  # chunks known to have their pages

    def write_view(self, length: int, offset: int) -> memoryview | None:
        """The range, its pages allocated; None if tmpfs cannot allocate them."""
        first, last = offset // CHUNK, (offset + length - 1) // CHUNK
        known = self._allocated
        if first not in known or (last != first and not known.issuperset(range(first, last + 1))):
            start, end = first * CHUNK, min((last + 1) * CHUNK, self._size)
            try:
                self._allocate(start, end - start)
            except OSError as exc:
                if exc.errno not in _CANNOT_ALLOCATE:
                    return None  # ENOSPC above all
            known.update(range(first, last + 1))
        return self._view[offset : offset + length]

    def allocated(self, length: int, offset: int) -> bool:
        """Whether every page of the range is known to be allocated (written through
        :meth:`write_view`, not trimmed since): data, which reads through the mapping
        without a fault that would allocate a hole's page."""
        first, last = offset // CHUNK, (offset + length - 1) // CHUNK
        known = self._allocated
        return first in known and (last == first or known.issuperset(range(first, last + 1)))

    def view(self, length: int, offset: int) -> memoryview:
        """The range as it is now (for a reply: read when it is sent)."""
        return self._view[offset : offset + length]

    def forget(self, length: int, offset: int) -> None:
        """Pages of this range may have been given back (a hole punched)."""
        if not length:
            return
        first, last = offset // CHUNK, (offset + length - 1) // CHUNK
        known = self._allocated
        if last - first + 1 > len(known):
            known.difference_update([i for i in known if first <= i <= last])
        else:
            known.difference_update(range(first, last + 1))

    def close(self) -> None:
        """Unmap, unless a view is still held (the last one unmaps it then)."""
        self._view.release()
        with contextlib.suppress(BufferError):
            self._mapping.close()
