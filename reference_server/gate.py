"""The asyncio side of admission: the loop's clock, one timer, and the callbacks.

:class:`~.admission.Admission` decides and never waits; this gate feeds it
the event loop's time, keeps one loop timer armed for its next deadline, and
tells the connections concerned what was decided (a slot granted, a wait or
a negotiation run out, an eviction).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Protocol

from .admission import Admission, Arrival, Expired


class Admittee(Hashable, Protocol):
    """What admission needs of a connection."""

    def slot_granted(self) -> None:
        """A slot under --shared freed up while this connection waited: greet it."""

    def deadline_passed(self, expired: Expired[Admittee]) -> None:
        """One of this connection's admission deadlines passed."""

    def evict(self) -> None:
        """Close this negotiating connection to make room for another."""


class AdmissionGate:
    def __init__(
        self, admission: Admission[Admittee], on_last_client_left: Callable[[], None]
    ) -> None:
        self.admission = admission
        self._on_last_client_left = on_last_client_left
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for: float | None = None

    @property
    def stopping(self) -> bool:
        return self.admission.stopping

    def arrive(self, who: Admittee) -> Arrival[Admittee]:
        arrival = self.admission.arrive(who, self._now())
        if arrival.evicted is not None:
            arrival.evicted.evict()
        self._rearm()
        return arrival

    def negotiated(self, who: Admittee) -> None:
        self.admission.negotiated(who)
        self._rearm()

    def depart(self, who: Admittee) -> None:
        departure = self.admission.depart(who)
        self._rearm()
        if departure.granted is not None:
            departure.granted.slot_granted()
        elif departure.last_client_left:
            self._on_last_client_left()

    def stop(self) -> None:
        self.admission.stop()

    def close(self) -> None:
        """Cancel the timer (the server is gone)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._armed_for = None

    def run_deadlines(self, now: float) -> None:
        """Act on every deadline passed by ``now`` (the timer calls this; tests may too)."""
        for expired in self.admission.expire(now):
            expired.key.deadline_passed(expired)
        self._rearm()

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _fire(self) -> None:
        armed_for = self._armed_for
        self._timer = None
        self._armed_for = None
        # call_at may run a hair before its time (the loop's clock resolution).
        self.run_deadlines(max(self._now(), armed_for or 0.0))

    def _rearm(self) -> None:
        when = self.admission.next_deadline()
        if when == self._armed_for:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_for = when
        if when is not None:
            self._timer = asyncio.get_running_loop().call_at(when, self._fire)
