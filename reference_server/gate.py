"""The asyncio side of admission: the loop's clock, one timer, and the callbacks.

:class:`~.admission.Admission` decides and never waits; this gate feeds it
the event loop's time, keeps one loop timer armed for its next deadline, and
tells the connections concerned what was decided (a slot granted, a wait or
a negotiation run out), and the listener when there is room again.
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


class AdmissionGate:
    def __init__(
        self,
        admission: Admission[Admittee],
        on_last_client_left: Callable[[], None],
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``clock`` replaces the loop's (a test's own); deadlines then run only by
        :meth:`run_deadlines`, never by a loop timer."""
        self.admission = admission
        self._on_last_client_left = on_last_client_left
        self._clock = clock
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for: float | None = None
        #: Called when room frees up after the cap was reached (the listener resumes).
        self.on_room: Callable[[], None] | None = None

    @property
    def stopping(self) -> bool:
        return self.admission.stopping

    @property
    def has_room(self) -> bool:
        return self.admission.has_room

    def arrive(self, who: Admittee) -> Arrival:
        arrival = self.admission.arrive(who, self._now())
        self._rearm()
        return arrival

    def progressed(self, who: Admittee) -> None:
        self.admission.progressed(who, self._now())
        self._rearm()

    def negotiated(self, who: Admittee) -> None:
        self.admission.negotiated(who)
        self._rearm()

    def depart(self, who: Admittee) -> None:
        departure = self.admission.depart(who, self._now())
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
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _fire(self) -> None:
        armed_for = self._armed_for
        self._timer = None
        self._armed_for = None
        # call_at may run a hair before its time (the loop's clock resolution).
        self.run_deadlines(max(self._now(), armed_for or 0.0))

    def _rearm(self) -> None:
        if self.on_room is not None and self.admission.has_room:
            self.on_room()
        if self._clock is not None:
            return
        when = self.admission.next_deadline()
        if when == self._armed_for:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_for = when
        if when is not None:
            self._timer = asyncio.get_running_loop().call_at(when, self._fire)
