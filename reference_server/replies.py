"""Replies on their way to one client's socket.

Replies are queued as memoryviews (never copied to be joined, unless small)
and handed to the transport as the socket drains: small ones joined into one
write, so the replies of one pass leave in one system call; large ones in
slices, so the transport never copies a whole payload into its own buffer.
Between the replies sit budget markers: the bytes a request held, given back
to the server-wide :class:`~.budget.ByteBudget` once everything before the
marker has been handed over.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .budget import ByteBudget
from .protocol.transmission import Buffer

JOIN_BELOW = 64 * 1024
WRITE_SLICE = 256 * 1024


class ReplyQueue:
    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        # Replies' buffers (large ones as memoryviews, so slicing copies
        # nothing) and budget markers.
        self._items: deque[Buffer | int] = deque()
        #: Reply bytes queued and not yet handed to the transport.
        self.unsent = 0
        #: The transport asked us to stop writing (asyncio's pause_writing).
        self.paused = False

    def add(self, buffers: list[Buffer], cost: int = 0) -> None:
        """Queue one reply; ``cost`` returns to the budget once it is handed over."""
        items = self._items
        for buffer in buffers:
            if type(buffer) is memoryview:
                buffer = buffer.cast("B")
            elif len(buffer) >= JOIN_BELOW:
                buffer = memoryview(buffer)
            items.append(buffer)
            self.unsent += len(buffer)
        if cost:
            self._items.append(cost)

    def flush(self, transport: asyncio.Transport | None) -> None:
        """Hand over what the transport will take now."""
        if transport is None or transport.is_closing():
            self.discard()
            return
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
        self._budget.give(sum(item for item in self._items if isinstance(item, int)))
        self._items.clear()
        self.unsent = 0

    def _write(self, transport: asyncio.Transport, data: Buffer, size: int) -> None:
        self.unsent -= size
        transport.write(data)  # may call pause_writing() before returning
