"""Who may negotiate and who may be served: pure bookkeeping, no asyncio.

One object owns every admission rule of the server, so that no two modules
change the same counters:

* the connection limit (``-e/--shared``): clients counted against it, and the
  clients beyond it that wait a little for a slot before being refused
  ("Protocol phases / Handshake / Termination of the session during option
  haggling": the server "MUST ... simply error inbound options until the
  client gets the hint that it is unwelcome");
* the clients in option haggling (``--max-handshaking``): at the cap the
  server stops accepting (:attr:`Admission.has_room`), and the kernel's
  listen backlog holds newcomers until a negotiation ends, as qemu-nbd does
  at its connection limit.  Nobody is evicted to make room: a client that
  keeps making progress is never closed because others arrived after it;
* the deadlines on option haggling, which are what sheds stalled and slow
  clients (the CVE-2024-7409 class): each client must answer every server
  message within ``--handshake-progress-timeout``, and finish negotiating
  within ``--handshake-timeout``.

Time is passed in (``now``, in seconds of any monotonic clock), never read, so
the rules are tested without an event loop or a sleep.  The asyncio side
(gate.py) turns :meth:`Admission.next_deadline` into one loop timer and hands
what :meth:`Admission.expire` returns to the connections.  Connections are
opaque keys here.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Verdict(enum.Enum):
    """What a new connection may do."""

    ADMITTED = "admitted"  # counted against --shared: greet it and negotiate
    WAIT = "wait"  # beyond --shared: hold it ungreeted until a slot frees or the wait ends
    REFUSED = "refused"  # greet it, then error every option (NBD_REP_ERR_POLICY / _SHUTDOWN)


class Deadline(enum.Enum):
    """The deadlines admission keeps, and what passing each one means."""

    SLOT_WAIT = "no slot freed up in time: refuse"
    HANDSHAKE = "option haggling took too long: close"
    PROGRESS = "the client did not answer the server's last message in time: close"


@dataclass(frozen=True)
class Arrival:
    verdict: Verdict
    reason: str = ""  # why the client waits or is refused


@dataclass(frozen=True)
class Expired(Generic[K]):
    key: K
    deadline: Deadline
    reason: str


@dataclass(frozen=True)
class Departure(Generic[K]):
    granted: K | None = None  # a waiting client that now holds the freed slot
    last_client_left: bool = False  # without --persistent, time to stop (qemu-nbd's lifecycle)


class Admission(Generic[K]):
    def __init__(
        self,
        *,
        shared: int = 1,
        persistent: bool = False,
        max_handshaking: int = 64,
        handshake_timeout: float = 10.0,
        progress_timeout: float = 5.0,
        slot_wait: float = 2.0,
    ) -> None:
        self.shared = shared
        self.persistent = persistent
        self.max_handshaking = max_handshaking
        self.handshake_timeout = handshake_timeout
        self.progress_timeout = progress_timeout
        self.slot_wait = slot_wait
        self.stopping = False
        #: Connections counted against ``shared``.
        self.clients: set[K] = set()
        self.served_any = False
        #: Connections in option haggling, oldest first.
        self.handshaking: dict[K, None] = {}
        #: Connections beyond ``shared`` waiting for a slot, oldest first, with their reason.
        self.waiting: dict[K, str] = {}
        self._deadlines: dict[tuple[K, Deadline], float] = {}
        self._heap: list[tuple[float, int, K, Deadline]] = []
        self._order = itertools.count()

    # ------------------------------------------------------------- events

    @property
    def has_room(self) -> bool:
        """May the server accept another connection now?  (Else it leaves it in the backlog.)"""
        return len(self.handshaking) < self.max_handshaking and not self.stopping

    def arrive(self, key: K, now: float) -> Arrival:
        """A connection was accepted: count it, or say why it must wait or is refused.

        The server accepts only while :attr:`has_room`; a connection that
        arrives beyond the cap all the same (socket activation hands over
        whatever is queued) is admitted too: nobody is closed to make room.
        """
        self.handshaking[key] = None
        if self.handshake_timeout:
            self._set(key, Deadline.HANDSHAKE, now + self.handshake_timeout)
        if self.stopping:
            self.greeted(key, now)
            return Arrival(Verdict.REFUSED, "the server is shutting down")
        if self.shared and len(self.clients) >= self.shared:
            reason = f"the server allows {self.shared} connection(s) at a time"
            if not self.slot_wait:
                self.greeted(key, now)
                return Arrival(Verdict.REFUSED, reason)
            # Full: wait a little for a slot before refusing, as a client that
            # connects just after another left should not lose a race.
            self.waiting[key] = reason
            self._set(key, Deadline.SLOT_WAIT, now + self.slot_wait)
            return Arrival(Verdict.WAIT, reason)
        self.clients.add(key)
        self.served_any = True
        self.greeted(key, now)
        return Arrival(Verdict.ADMITTED, "")

    def greeted(self, key: K, now: float) -> None:
        """The server spoke (the greeting, an option reply): the client's turn starts now."""
        if key in self.handshaking and self.progress_timeout:
            self._set(key, Deadline.PROGRESS, now + self.progress_timeout)

    def progressed(self, key: K, now: float) -> None:
        """The client's message was answered: its next turn starts now."""
        self.greeted(key, now)

    def negotiated(self, key: K) -> None:
        """The connection left option haggling (transmission, or closing)."""
        self.handshaking.pop(key, None)
        self._clear(key, Deadline.HANDSHAKE)
        self._clear(key, Deadline.PROGRESS)

    def depart(self, key: K, now: float) -> Departure[K]:
        """The connection is gone: free what it held, maybe hand its slot on."""
        self.negotiated(key)
        self._stop_waiting(key)
        if key not in self.clients:
            return Departure()
        self.clients.discard(key)
        if self.waiting and not self.stopping:
            waiter = next(iter(self.waiting))
            self._stop_waiting(waiter)
            self.clients.add(waiter)
            self.greeted(waiter, now)
            return Departure(granted=waiter)
        last = not self.clients and not self.persistent and self.served_any
        return Departure(last_client_left=last)

    def stop(self) -> None:
        """The server is shutting down: admit nobody from now on."""
        self.stopping = True

    # ---------------------------------------------------------- deadlines

    def next_deadline(self) -> float | None:
        """When :meth:`expire` next has something to return, or None."""
        heap = self._heap
        while heap:
            when, _, key, kind = heap[0]
            if self._deadlines.get((key, kind)) == when:
                return when
            heapq.heappop(heap)  # cancelled or moved
        return None

    def expire(self, now: float) -> list[Expired[K]]:
        """The deadlines passed by ``now``, oldest first; each is forgotten once returned."""
        passed: list[Expired[K]] = []
        while (when := self.next_deadline()) is not None and when <= now:
            _, _, key, kind = heapq.heappop(self._heap)
            del self._deadlines[key, kind]
            if kind is Deadline.SLOT_WAIT:
                # Refused now: greeted, then every option is errored.
                passed.append(Expired(key, kind, self.waiting.pop(key, "")))
                self.greeted(key, when)
            elif kind is Deadline.HANDSHAKE:
                self.negotiated(key)
                passed.append(Expired(key, kind, "option haggling took too long"))
            else:
                self.negotiated(key)
                passed.append(Expired(key, kind, "no answer to the server's last message"))
        return passed

    def _set(self, key: K, kind: Deadline, when: float) -> None:
        self._deadlines[key, kind] = when
        heapq.heappush(self._heap, (when, next(self._order), key, kind))

    def _clear(self, key: K, kind: Deadline) -> None:
        self._deadlines.pop((key, kind), None)

    def _stop_waiting(self, key: K) -> None:
        self.waiting.pop(key, None)
        self._clear(key, Deadline.SLOT_WAIT)
