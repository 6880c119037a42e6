"""The libnbd handle a check holds: every wait bounded, every write permitted.

libnbd's synchronous calls (``h.pread``, ``h.flush``, ``h.opt_go``...) wait
for ever on a server that never answers, and nothing in libnbd stops a
check from writing.  :class:`Handle` wraps ``nbd.NBD`` so that checks keep
reading like libnbd's Python API while

- each blocking call has a deadline: when it passes, a :class:`Watchdog`
  shuts the handle's socket down, libnbd returns at once, and the check fails
  with "no reply to NBD_CMD_READ within 10 s" (:class:`ServerTimeout`);
- each request that changes data (``pwrite``, ``trim``, ``zero`` and their
  ``aio_`` forms) first asks the connection's
  :class:`~conformance.guard.WritePermission`, so nothing is sent to a target
  that may not be written;
- each call is written to the check's evidence (:mod:`conformance.evidence`)
  with its arguments and its result or error, so that a failure shows the
  sequence of libnbd calls that led to it.

libnbd releases the GIL while it waits, so the watchdog thread runs while a
call blocks; it needs the socket's descriptor, which is read once after
connecting (``aio_get_fd`` takes the handle's lock, which a blocked call holds).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import nbd

from conformance import evidence
from conformance.guard import UNRESTRICTED, WritePermission

#: Seconds a check waits for any one reply before the server is deemed stuck.
DEFAULT_TIMEOUT = 10.0


class ServerTimeout(AssertionError):
    """The server did not answer within the deadline."""


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

#: The blocking calls of libnbd's API that talk to the server, and what they send.
BLOCKING_CALLS = {
    "pread": "NBD_CMD_READ",
    "pread_structured": "NBD_CMD_READ",
    "pwrite": "NBD_CMD_WRITE",
    "flush": "NBD_CMD_FLUSH",
    "trim": "NBD_CMD_TRIM",
    "zero": "NBD_CMD_WRITE_ZEROES",
    "cache": "NBD_CMD_CACHE",
    "block_status": "NBD_CMD_BLOCK_STATUS",
    "opt_go": "NBD_OPT_GO",
    "opt_info": "NBD_OPT_INFO",
    "opt_list": "NBD_OPT_LIST",
    "opt_list_meta_context": "NBD_OPT_LIST_META_CONTEXT",
    "opt_abort": "NBD_OPT_ABORT",
    "shutdown": "NBD_CMD_DISC",
}

#: The calls that send a request changing the export's data.
WRITING_CALLS = {
    "pwrite": "NBD_CMD_WRITE",
    "aio_pwrite": "NBD_CMD_WRITE",
    "trim": "NBD_CMD_TRIM",
    "aio_trim": "NBD_CMD_TRIM",
    "zero": "NBD_CMD_WRITE_ZEROES",
    "aio_zero": "NBD_CMD_WRITE_ZEROES",
}


#: Calls made in polling loops or for bookkeeping: not worth a line of evidence.
UNRECORDED_CALLS = {
    "poll",
    "aio_command_completed",
    "aio_peek_command_completed",
    "aio_get_fd",
    "aio_get_direction",
    "aio_notify_read",
    "aio_notify_write",
    "aio_in_flight",
    "get_handle_name",
}


def _recorded(name: str) -> bool:
    return name not in UNRECORDED_CALLS and not name.startswith("aio_is_")


class Handle:
    """An ``nbd.NBD`` with deadlines on blocking calls and permission for writes.

    Every other attribute is the libnbd handle's own.
    """

    def __init__(
        self,
        h: nbd.NBD,
        *,
        permission: WritePermission = UNRESTRICTED,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.nbd = h
        self.permission = permission
        self.timeout = timeout
        self._fd: int | None = None
        self.name = evidence.connection("nbd")

    def __repr__(self) -> str:
        return f"<Handle {self.nbd.get_handle_name()}>"

    def connected(self, how: str = "") -> None:
        """Note the socket once connected (see the module docstring), and HOW in the evidence."""
        with contextlib.suppress(nbd.Error):
            self._fd = self.nbd.aio_get_fd()
        with contextlib.suppress(nbd.Error):
            evidence.record(
                self.name,
                f"connected{how}: export {self.nbd.get_export_name()!r}, "
                f"{'negotiating' if self.nbd.aio_is_negotiating() else 'ready'}",
            )

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.nbd, name)
        if not callable(attr) or not _recorded(name):
            return attr
        return self._guarded(name, attr, WRITING_CALLS.get(name), BLOCKING_CALLS.get(name))

    def _guarded(
        self, name: str, call: Callable[..., Any], writes: str | None, sends: str | None
    ) -> Callable[..., Any]:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            shown = ", ".join(
                [evidence.summarise(a) for a in args]
                + [f"{k}={evidence.summarise(v)}" for k, v in kwargs.items()]
            )
            try:
                if writes is not None:
                    self.permission.require(writes)
                if sends is None or self._fd is None:
                    result = call(*args, **kwargs)
                else:
                    result = self._bounded(call, sends, args, kwargs)
            except nbd.Error as err:
                evidence.record(self.name, f"{name}({shown}) -> nbd.Error: {err.string}")
                raise
            except Exception as err:
                evidence.record(self.name, f"{name}({shown}) -> {type(err).__name__}: {err}")
                raise
            evidence.record(self.name, f"{name}({shown}) -> {evidence.summarise(result)}")
            return result

        return guarded

    def _bounded(
        self, call: Callable[..., Any], what: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        assert self._fd is not None
        alarm = WATCHDOG.arm(self._fd, self.timeout)
        try:
            result = call(*args, **kwargs)
        except BaseException as err:
            if WATCHDOG.disarm(alarm) and isinstance(err, nbd.Error):
                raise ServerTimeout(
                    f"no reply to {what} within {self.timeout:g} s "
                    "(the suite closed the connection)"
                ) from err
            raise
        if WATCHDOG.disarm(alarm):
            raise ServerTimeout(f"no reply to {what} within {self.timeout:g} s")
        return result
