"""Replies on their way to one client's socket.

Replies are queued as they were built (buffers, memoryviews of the backend's
memory, regions of its file) and leave by one of two roads:

* **straight to the socket** (:class:`~.socket_writer.SocketWriter`, plain
  sockets): parts gathered by ``sendmsg`` and file regions by ``sendfile``,
  no copy in Python; what the socket does not take waits here until it
  becomes writable.
* **through the transport** (TLS, or while the transport still holds bytes
  of its own): small buffers joined into one write, so the replies of one
  pass leave in one system call; large ones in slices, so the transport
  never copies a whole payload into its own buffer.

Between the replies sit budget markers: the bytes a request held, given back
to the server-wide :class:`~.budget.ByteBudget` once everything before the
marker has been handed over.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Sequence

from .backends.base import FileRegion
from .budget import ByteBudget
from .dispatch import ReplyPart
from .protocol.transmission import Buffer
from .socket_writer import MAX_PARTS, SocketWriter

JOIN_BELOW = 64 * 1024
WRITE_SLICE = 256 * 1024


class ReplyQueue:
    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        # Replies' parts (large buffers as memoryviews, so slicing copies
        # nothing) and budget markers.
        self._items: deque[ReplyPart | int] = deque()
        #: Reply bytes queued and not yet handed over.
        self.unsent = 0
        #: The transport asked us to stop writing (asyncio's pause_writing).
        self.paused = False
        #: Sends straight to the socket when set (plain sockets only).
        self.writer: SocketWriter | None = None

    def add(self, parts: Sequence[ReplyPart], cost: int = 0) -> None:
        """Queue one reply; ``cost`` returns to the budget once it is handed over."""
        items = self._items
        for part in parts:
            if isinstance(part, FileRegion):
                items.append(part)
                self.unsent += part.length
                continue
            if type(part) is memoryview:
                part = part.cast("B")
            elif len(part) >= JOIN_BELOW:
                part = memoryview(part)
            items.append(part)
            self.unsent += len(part)
        if cost:
            self._items.append(cost)

    def flush(self, transport: asyncio.Transport | None) -> None:
        """Hand over what the socket (or the transport) will take now."""
        if transport is None or transport.is_closing():
            self.discard()
            return
        writer = self.writer
        try:
            if writer is None or transport.get_write_buffer_size():
                self._flush_through(transport)
            elif not writer.waiting:
                self._flush_direct(writer)
        except OSError:  # the client is gone, or a file shrank under a reply
            self.discard()
            transport.abort()

    def _flush_direct(self, writer: SocketWriter) -> None:
        items, budget = self._items, self._budget
        while items:
            head = items[0]
            if type(head) is int:
                items.popleft()
                budget.give(head)
                continue
            if type(head) is FileRegion:
                sent = writer.sendfile(head)
                self.unsent -= sent
                if sent == head.length:
                    items.popleft()
                    continue
                if not sent:  # the socket is full
                    writer.wait_writable()
                    return
                # Partly sent: try again at once (the socket is full, or the
                # file ended early, which the next call reports).
                items[0] = FileRegion(head.fd, head.offset + sent, head.length - sent)
                continue
            # The replies of a pass leave in one sendmsg: gather across budget
            # markers (they stay queued, and are given back below once the
            # bytes before them have left), up to a file region.
            parts: list[Buffer] = []
            size = 0
            for item in items:
                if type(item) is int:
                    continue
                if type(item) is FileRegion or len(parts) == MAX_PARTS:
                    break
                parts.append(item)  # type: ignore[arg-type]  # neither int nor FileRegion
                size += len(item)  # type: ignore[arg-type]
            sent = writer.send(parts)
            self.unsent -= sent
            self._drop_sent(sent, len(parts))
            if sent < size:
                writer.wait_writable()
                return

    def _drop_sent(self, sent: int, count: int) -> None:
        """Remove the ``count`` buffers at the front whose first ``sent`` bytes have left
        (a partly sent one keeps its rest), and give back the budget markers among them."""
        items, budget = self._items, self._budget
        while count:
            head = items[0]
            if type(head) is int:
                items.popleft()
                budget.give(head)
                continue
            assert type(head) is not FileRegion
            length = len(head)  # type: ignore[arg-type]
            if sent < length:
                if sent:
                    items[0] = memoryview(head).cast("B")[sent:]  # type: ignore[arg-type]
                return
            sent -= length
            count -= 1
            items.popleft()

    def _flush_through(self, transport: asyncio.Transport) -> None:
        items, budget = self._items, self._budget
        batch: list[Buffer] = []
        size = 0
        while items and not self.paused:
            if transport.is_closing():  # the client hung up during this flush
                self.discard()
                return
            item = items[0]
            if isinstance(item, int):
                items.popleft()
                budget.give(item)
                continue
            if isinstance(item, FileRegion):
                # Only a file that lives in memory gives regions: reading it
                # here does not block.
                data = os.pread(item.fd, item.length, item.offset)
                if len(data) < item.length:
                    raise OSError(5, "file shrank underneath the export")
                items[0] = memoryview(data)
                continue
            if len(item) >= JOIN_BELOW:
                if batch:
                    self._write(transport, b"".join(batch), size)
                    batch, size = [], 0
                    continue  # the write may have paused us
                if len(item) > WRITE_SLICE:
                    items[0] = item[WRITE_SLICE:]
                    item = item[:WRITE_SLICE]
                else:
                    items.popleft()
                self._write(transport, item, len(item))
                continue
            items.popleft()
            batch.append(item)
            size += len(item)
            if size >= JOIN_BELOW:
                self._write(transport, b"".join(batch), size)
                batch, size = [], 0
        if batch:
            self._write(transport, b"".join(batch), size)

    def discard(self) -> None:
        """The client is gone: drop the replies, give their budget back."""
        self._budget.give(sum(item for item in self._items if type(item) is int))
        self._items.clear()
        self.unsent = 0

    def _write(self, transport: asyncio.Transport, data: Buffer, size: int) -> None:
        self.unsent -= size
        transport.write(data)  # may call pause_writing() before returning
