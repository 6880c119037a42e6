"""Sparse in-memory storage (``--memory SIZE``).

Only pages that hold non-zero data exist, so a 1 TiB export costs what is
written.  Holes read as zeroes and are reported as NBD_STATE_HOLE|ZERO.
"""

from __future__ import annotations

import threading

from ..protocol.constants import StateFlag
from .base import Backend, Extent, ReadPart

PAGE_SIZE = 32 * 1024
_ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_VIEW = memoryview(_ZERO_PAGE)
_HOLE = (StateFlag.HOLE | StateFlag.ZERO).value
_DATA = 0


class MemoryBackend(Backend):
    blocking = False
    can_fast_zero = True

    def __init__(self, size: int) -> None:
        self.size = size
        self._pages: dict[int, bytearray] = {}
        # Connections may be served from several threads; a page dict update
        # is not atomic with respect to a concurrent read-modify-write.
        self._lock = threading.Lock()

    def pread(self, length: int, offset: int) -> bytes | bytearray | memoryview:
        out = bytearray(length)
        self.pread_into(memoryview(out), offset, fresh=True)
        return out

    def pread_into(self, view: memoryview, offset: int, *, fresh: bool = False) -> None:
        """Copy pages into ``view``; ``fresh`` says it is already zeroed (holes skipped)."""
        length = len(view)
        pos = 0
        with self._lock:
            while pos < length:
                index, start = divmod(offset + pos, PAGE_SIZE)
                n = min(PAGE_SIZE - start, length - pos)
                page = self._pages.get(index)
                if page is not None:
                    view[pos : pos + n] = page[start : start + n]
                elif not fresh:
                    view[pos : pos + n] = _ZERO_VIEW[:n]
                pos += n

    def read_parts(self, length: int, offset: int) -> list[ReadPart]:
        """Views of the pages (and of one page of zeroes for holes)."""
        parts: list[ReadPart] = []
        pages = self._pages
        pos = 0
        while pos < length:
            index, start = divmod(offset + pos, PAGE_SIZE)
            n = min(PAGE_SIZE - start, length - pos)
            page = pages.get(index)
            parts.append(
                memoryview(page)[start : start + n] if page is not None else _ZERO_VIEW[:n]
            )
            pos += n
        return parts

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
        src = memoryview(data).cast("B")
        pos = 0
        length = len(src)
        with self._lock:
            while pos < length:
                index, start = divmod(offset + pos, PAGE_SIZE)
                n = min(PAGE_SIZE - start, length - pos)
                page = self._pages.get(index)
                if page is None:
                    if not any(src[pos : pos + n]):
                        pos += n
                        continue
                    page = self._pages[index] = bytearray(PAGE_SIZE)
                page[start : start + n] = src[pos : pos + n]
                pos += n

    def flush(self) -> None:
        """Memory has no volatile cache beyond itself: nothing to do."""

    def trim(self, length: int, offset: int, fua: bool) -> None:
        self._zero_range(length, offset)

    def zero(self, length: int, offset: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        # Zeroing means forgetting pages: always faster than writing.  With
        # NBD_CMD_FLAG_NO_HOLE the area "MUST be fully provisioned", so its
        # pages are allocated (and then read back as data, not holes).
        if may_trim:
            self._zero_range(length, offset)
            return
        end = offset + length
        with self._lock:
            for index in range(offset // PAGE_SIZE, (end - 1) // PAGE_SIZE + 1):
                page_start = index * PAGE_SIZE
                lo = max(offset, page_start) - page_start
                hi = min(end, page_start + PAGE_SIZE) - page_start
                page = self._pages.get(index)
                if page is None:
                    self._pages[index] = bytearray(PAGE_SIZE)
                else:
                    page[lo:hi] = bytes(hi - lo)

    def _zero_range(self, length: int, offset: int) -> None:
        end = offset + length
        with self._lock:
            first = offset // PAGE_SIZE
            last = (end - 1) // PAGE_SIZE if length else first - 1
            if last - first + 1 > len(self._pages):
                indices = [i for i in self._pages if first <= i <= last]
            else:
                indices = [i for i in range(first, last + 1) if i in self._pages]
            for index in indices:
                page_start = index * PAGE_SIZE
                lo = max(offset, page_start) - page_start
                hi = min(end, page_start + PAGE_SIZE) - page_start
                page = self._pages[index]
                if lo == 0 and hi == PAGE_SIZE:
                    del self._pages[index]
                    continue
                page[lo:hi] = bytes(hi - lo)
                if page == _ZERO_PAGE:
                    del self._pages[index]

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
        return len(self._pages) * PAGE_SIZE
