"""A server-wide budget of request bytes held in memory.

"Memory bounded by configuration, not by what clients send": every write
payload and every read reply takes its size from this budget before it is
buffered, and gives it back once the bytes have left for the socket.  A
request that does not fit waits (its connection stops reading) instead of
allocating.  One request larger than the whole budget may still run alone,
so no valid request can wait forever.
"""

from __future__ import annotations

from collections.abc import Callable


class ByteBudget:
    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._waiters: dict[Callable[[], None], None] = {}

    def try_take(self, nbytes: int) -> bool:
        """Take ``nbytes`` if they fit; nothing (a request that buffers
        nothing) always fits, even while one large request overdraws."""
        if nbytes and self.used and self.used + nbytes > self.total:
            return False
        self.used += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.used -= nbytes
        if self._waiters and nbytes:
            waiters, self._waiters = self._waiters, {}
            for wake in waiters:
                wake()

    def wait(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` (once) the next time bytes are given back."""
        self._waiters[wake] = None

    def forget(self, wake: Callable[[], None]) -> None:
        self._waiters.pop(wake, None)
