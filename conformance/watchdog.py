"""One thread that ends a wait on a socket when its deadline passes.

libnbd's synchronous calls wait for ever on a server that never answers; they
release the GIL while they wait, so a thread can end the wait for them by
shutting the socket down (:mod:`conformance.handle` arms it around each call).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time


class _Alarm:
    __slots__ = ("cancelled", "deadline", "fd", "fired")

    def __init__(self, fd: int, deadline: float) -> None:
        self.fd = fd
        self.deadline = deadline
        self.cancelled = False
        self.fired = False


class Watchdog:
    """One thread that shuts a socket down when the call waiting on it runs out of time.

    Shutting the socket down (rather than closing it) leaves the descriptor
    to its owner and wakes every waiter on it, in libnbd or elsewhere.  Firing
    and disarming take the same lock, so a descriptor is never shut down after
    its call returned (it could by then belong to another socket).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Alarm]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, fd: int, timeout: float) -> _Alarm:
        alarm = _Alarm(fd, time.monotonic() + timeout)
        with self._cond:
            heapq.heappush(self._heap, (alarm.deadline, next(self._order), alarm))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="conformance-watchdog", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is alarm:
                self._cond.notify()
        return alarm

    def disarm(self, alarm: _Alarm) -> bool:
        """Cancel ALARM; True if it had already fired."""
        with self._cond:
            alarm.cancelled = True
            return alarm.fired

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].cancelled:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait(timeout=60)
                    if not self._heap:
                        self._thread = None
                        return
                    continue
                left = self._heap[0][0] - time.monotonic()
                if left > 0:
                    self._cond.wait(timeout=left)
                    continue
                _, _, alarm = heapq.heappop(self._heap)
                alarm.fired = True
                shut_down(alarm.fd)


def shut_down(fd: int) -> None:
    """shutdown(2) the socket behind FD, leaving FD itself open."""
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=os.dup(fd))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


WATCHDOG = Watchdog()
