"""Sparse in-memory storage (``--memory SIZE``): one anonymous mapping.

The store is a single private anonymous ``mmap`` of the export's size,
mapped with MAP_NORESERVE: the kernel lends no memory until a page is
written (a read of an untouched page maps its one shared zero page), so a
1 TiB export costs what is written.  Beside it, a set of the 32 KiB pages
that may hold data answers base:allocation: the others are holes
(NBD_STATE_HOLE|ZERO) and read as zeroes.  Trimming gives whole pages back
to the kernel (``madvise(MADV_DONTNEED)``).

Because the store is one mapping, a read's data is one view of it
(:meth:`MemoryBackend.read_parts`) and a write's payload can be received
straight into it (:meth:`MemoryBackend.write_view`).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading

from ..protocol.constants import StateFlag
from .base import Backend, Extent, ReadPart

#: The unit of allocation the extents report (never below the kernel's page).
PAGE_SIZE = max(32 * 1024, mmap.PAGESIZE)
_ZERO_PAGE = bytes(PAGE_SIZE)
_ZEROES = memoryview(bytes(max(1 << 20, PAGE_SIZE)))
_HOLE = (StateFlag.HOLE | StateFlag.ZERO).value
_DATA = 0
# <sys/mman.h>: reserve no swap for the mapping (its pages are committed only
# when written).  Python 3.11's mmap module does not export it; 0x4000 is its
# value on every Linux architecture that has it.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def anonymous_memory(size: int) -> mmap.mmap | bytearray:
    """Zero-filled memory of ``size`` bytes that costs nothing until written.

    Raises OSError (ENOMEM) when the kernel refuses a mapping that large
    (beyond the address space, or with strict overcommit).
    """
    if size == 0:
        return bytearray()  # mmap refuses an empty mapping
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    try:
        try:
            return mmap.mmap(-1, size, flags=flags | MAP_NORESERVE)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return mmap.mmap(-1, size, flags=flags)  # a kernel without MAP_NORESERVE
    except OverflowError:
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM)) from None


class MemoryBackend(Backend):
    blocking = False
    can_fast_zero = True

    def __init__(self, size: int) -> None:
        self.size = size
        try:
            self._memory = anonymous_memory(size)
        except OSError as exc:
            why = exc.strerror or str(exc)
            if exc.errno == errno.ENOMEM:
                why += " (more than the address space, or vm.overcommit_memory=2)"
            raise OSError(exc.errno, f"cannot map {size} bytes: {why}") from None
        self._view = memoryview(self._memory)
        # Indices of the pages that may hold data.  A page outside it reads
        # as zeroes (never written, trimmed, or given back to the kernel).
        self._pages: set[int] = set()
        # Trimming checks a page and then forgets it: the two must not be
        # split by a write from another thread.
        self._lock = threading.Lock()

    # ------------------------------------------------------------- reading

    def pread(self, length: int, offset: int) -> bytes | bytearray | memoryview:
        return self._view[offset : offset + length].tobytes()

    def pread_into(self, view: memoryview, offset: int) -> None:
        view[:] = self._view[offset : offset + len(view)]

    def read_parts(self, length: int, offset: int) -> list[ReadPart]:
        """One view of the store (holes read as the kernel's zero page)."""
        return [self._view[offset : offset + length]]

    # ------------------------------------------------------------- writing

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
        src = memoryview(data).cast("B")
        with self._lock:
            self._view[offset : offset + len(src)] = src
            self._mark(len(src), offset)

    def write_view(self, length: int, offset: int) -> memoryview | None:
        """The store itself: the payload is received where it belongs.

        Its pages are counted as data at once, so that what arrives before
        the write completes (or before its client vanishes) is never
        reported as a hole that reads as zero.  (No lock: the bytes arrive
        outside any lock anyway, and marking is one atomic set update.)
        """
        self._mark(length, offset)
        return self._view[offset : offset + length]

    def commit_write(self, length: int, offset: int, fua: bool) -> None:
        """Count the pages again: a trim from another connection may have forgotten
        them while the payload was arriving.  Memory needs nothing for FUA."""
        self._mark(length, offset)

    def _mark(self, length: int, offset: int) -> None:
        """Count pages as data (one set operation: atomic under the GIL)."""
        if not length:
            return
        first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
        if first == last:
            self._pages.add(first)
        else:
            self._pages.update(range(first, last + 1))

    def flush(self) -> None:
        """Memory has no volatile cache beyond itself: nothing to do."""

    # ------------------------------------------------------ trimming, zeroing

    def trim(self, length: int, offset: int, fua: bool) -> None:
        self._zero_range(length, offset)

    def zero(self, length: int, offset: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        # Zeroing means giving pages back: always faster than writing.  With
        # NBD_CMD_FLAG_NO_HOLE the area "MUST be fully provisioned", so zeroes
        # are written (and the pages then read back as data, not holes).
        if may_trim:
            self._zero_range(length, offset)
            return
        end = offset + length
        with self._lock:
            pos = offset
            while pos < end:
                n = min(len(_ZEROES), end - pos)
                self._view[pos : pos + n] = _ZEROES[:n]
                pos += n
            self._mark(length, offset)

    def _zero_range(self, length: int, offset: int) -> None:
        """Make a range read as zeroes, giving whole pages back to the kernel."""
        if not length:
            return
        end = offset + length
        first, last = offset // PAGE_SIZE, (end - 1) // PAGE_SIZE
        # Pages wholly inside the range are forgotten; those it only touches
        # (at most its first and its last) are zeroed in part.
        whole_first = first if offset == first * PAGE_SIZE else first + 1
        whole_last = last if end == self._page_end(last) else last - 1
        with self._lock:
            for index in {first, last}:
                if not whole_first <= index <= whole_last:
                    self._zero_part(index, offset, end)
            if whole_first <= whole_last:
                self._release(whole_first, whole_last)

    def _zero_part(self, index: int, offset: int, end: int) -> None:
        """Zero what of page ``index`` lies in [offset, end); a page left all zero is released."""
        if index not in self._pages:
            return  # a hole already reads as zeroes
        page_start, page_end = index * PAGE_SIZE, self._page_end(index)
        lo, hi = max(offset, page_start), min(end, page_end)
        self._view[lo:hi] = _ZEROES[: hi - lo]
        # (A slice of the mmap is bytes, compared with memcmp; a memoryview
        # would be compared byte by byte.)
        if self._memory[page_start:page_end] == _ZERO_PAGE[: page_end - page_start]:
            self._release(index, index)

    def _release(self, first: int, last: int) -> None:
        """Forget pages ``first`` to ``last`` and give their memory back."""
        start = first * PAGE_SIZE
        if isinstance(self._memory, mmap.mmap):
            self._memory.madvise(mmap.MADV_DONTNEED, start, self._page_end(last) - start)
        pages = self._pages
        if last - first + 1 > len(pages):
            pages.difference_update([i for i in pages if first <= i <= last])
        else:
            pages.difference_update(range(first, last + 1))

    def _page_end(self, index: int) -> int:
        return min((index + 1) * PAGE_SIZE, self.size)

    # ------------------------------------------------------ allocation status

    def extents(self, length: int, offset: int) -> list[Extent]:
        end = min(offset + length, self.size)
        if end <= offset:
            return []
        first, last = offset // PAGE_SIZE, (end - 1) // PAGE_SIZE
        with self._lock:
            if last - first < 4096:
                allocated = [i for i in range(first, last + 1) if i in self._pages]
            else:  # a huge sparse range: walk what exists, not every page
                allocated = sorted(i for i in self._pages if first <= i <= last)
        result: list[Extent] = []

        def add(n: int, flags: int) -> None:
            if result and result[-1].flags == flags:
                result[-1] = Extent(result[-1].length + n, flags)
            else:
                result.append(Extent(n, flags))

        pos = offset
        for index in allocated:
            start = max(index * PAGE_SIZE, offset)
            if start > pos:
                add(start - pos, _HOLE)
            stop = min((index + 1) * PAGE_SIZE, end)
            add(stop - start, _DATA)
            pos = stop
        if pos < end:
            add(end - pos, _HOLE)
        return result

    def next_data(self, offset: int) -> int:
        """The start of the first written page at or after ``offset`` (or the export size)."""
        first = offset // PAGE_SIZE
        with self._lock:
            index = min((i for i in self._pages if i >= first), default=None)
        return self.size if index is None else min(max(index * PAGE_SIZE, offset), self.size)

    def read_extents(self, length: int, offset: int) -> list[Extent]:
        """Data or holes for a read: a range within written pages is answered at once."""
        first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
        pages = self._pages
        if first in pages and (
            first == last or (last - first < 8 and all(i in pages for i in range(first, last + 1)))
        ):
            return [Extent(length, _DATA)]
        return self.extents(length, offset)

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the pages that may hold data (what the export costs, roughly)."""
        return len(self._pages) * PAGE_SIZE

    def close(self) -> None:
        """Unmap the store, unless a reply still holds a view of it (then the last view
        unmaps it)."""
        self._view.release()
        if isinstance(self._memory, mmap.mmap):
            with contextlib.suppress(BufferError):
                self._memory.close()
