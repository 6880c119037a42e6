"""Admission as pure bookkeeping: no event loop, time passed in by the test."""

from __future__ import annotations

import pytest

from reference_server.admission import Admission, Deadline, Verdict


def make(**kwargs: object) -> Admission[str]:
    options: dict[str, object] = {
        "shared": 0,
        "persistent": True,
        "max_handshaking": 64,
        "handshake_timeout": 10.0,
        "progress_timeout": 0.0,
        "slot_wait": 2.0,
    }
    options.update(kwargs)
    return Admission(**options)  # type: ignore[arg-type]


def test_unlimited_admits_everyone_and_counts_them() -> None:
    a = make()
    for i in range(5):
        assert a.arrive(f"c{i}", now=0.0).verdict is Verdict.ADMITTED
    assert len(a.clients) == 5
    assert list(a.handshaking) == ["c0", "c1", "c2", "c3", "c4"]


def test_beyond_shared_waits_then_gets_the_freed_slot() -> None:
    a = make(shared=1)
    assert a.arrive("first", 0.0).verdict is Verdict.ADMITTED
    arrival = a.arrive("second", 0.5)
    assert arrival.verdict is Verdict.WAIT
    assert arrival.reason == "the server allows 1 connection(s) at a time"
    assert a.next_deadline() == 2.5  # the slot wait ends before the handshake timeout
    departure = a.depart("first", 1.0)
    assert departure.granted == "second"
    assert not departure.last_client_left
    assert a.clients == {"second"}
    assert a.next_deadline() == 10.5, "the slot-wait deadline outlived the wait"


def test_a_wait_that_runs_out_is_refused_with_its_reason() -> None:
    a = make(shared=1)
    a.arrive("first", 0.0)
    a.arrive("second", 1.0)
    assert a.expire(2.9) == []
    (expired,) = a.expire(3.0)
    assert (expired.key, expired.deadline) == ("second", Deadline.SLOT_WAIT)
    assert expired.reason == "the server allows 1 connection(s) at a time"
    assert not a.waiting
    # The refused client is not counted: the slot goes to nobody when "first" leaves.
    assert a.depart("first", 0.0).granted is None


def test_no_slot_wait_refuses_at_once() -> None:
    a = make(shared=1, slot_wait=0.0)
    a.arrive("first", 0.0)
    assert a.arrive("second", 0.0).verdict is Verdict.REFUSED


def test_stopping_refuses_newcomers_and_grants_no_slot() -> None:
    a = make(shared=1)
    a.arrive("first", 0.0)
    a.arrive("waiter", 0.0)
    a.stop()
    arrival = a.arrive("late", 0.0)
    assert (arrival.verdict, arrival.reason) == (Verdict.REFUSED, "the server is shutting down")
    assert a.depart("first", 0.0).granted is None


@pytest.mark.parametrize("persistent", [False, True])
def test_last_client_leaving_stops_a_server_that_is_not_persistent(persistent: bool) -> None:
    a = make(persistent=persistent)
    a.arrive("only", 0.0)
    assert a.depart("only", 0.0).last_client_left is not persistent


def test_no_client_yet_is_not_a_last_client_leaving() -> None:
    a = make(persistent=False, shared=1, slot_wait=0.0)
    assert a.depart("never-arrived", 0.0).last_client_left is False


def test_handshake_timeout_expires_only_negotiating_clients() -> None:
    a = make(handshake_timeout=10.0)
    a.arrive("slow", 0.0)
    a.arrive("done", 1.0)
    a.negotiated("done")
    (expired,) = a.expire(11.0)
    assert (expired.key, expired.deadline) == ("slow", Deadline.HANDSHAKE)
    assert not a.handshaking
    assert a.next_deadline() is None


def test_zero_handshake_timeout_sets_no_deadline() -> None:
    a = make(handshake_timeout=0.0)
    a.arrive("c", 0.0)
    assert a.next_deadline() is None


def test_depart_forgets_every_deadline() -> None:
    a = make(shared=1)
    a.arrive("first", 0.0)
    a.arrive("second", 0.0)
    a.depart("second", 0.0)
    a.depart("first", 0.0)
    assert a.next_deadline() is None
    assert a.expire(100.0) == []


def test_at_max_handshaking_there_is_no_room_and_nobody_is_evicted() -> None:
    a = make(max_handshaking=2)
    a.arrive("a", 0.0)
    assert a.has_room
    a.arrive("b", 0.0)
    assert not a.has_room, "room for a third negotiation with --max-handshaking 2"
    # Socket activation may hand over more than the cap: admitted, nobody closed.
    assert a.arrive("c", 0.0).verdict is Verdict.ADMITTED
    assert list(a.handshaking) == ["a", "b", "c"]
    a.negotiated("a")
    assert not a.has_room, "b and c still negotiate"
    a.depart("b", 0.0)
    assert a.has_room


def test_a_client_that_keeps_answering_outlives_any_crowd() -> None:
    """Progress, not arrival order, decides who stays (issue 16)."""
    a = make(progress_timeout=1.0, handshake_timeout=30.0)
    a.arrive("steady", 0.0)
    for t in range(1, 20):
        a.arrive(f"crowd{t}", t * 0.5)  # newcomers keep arriving
        a.progressed("steady", t * 0.5)  # the server answered its next option
        expired = {e.key for e in a.expire(t * 0.5 + 0.4)}
        assert "steady" not in expired, f"a client answering every 0.5 s was shed at {t * 0.5}"
    assert "steady" in a.handshaking


def test_silence_past_the_progress_deadline_is_shed() -> None:
    a = make(progress_timeout=2.0, handshake_timeout=10.0)
    a.arrive("silent", 0.0)
    a.arrive("chatty", 0.0)
    a.progressed("chatty", 1.5)
    (expired,) = a.expire(2.0)
    assert (expired.key, expired.deadline) == ("silent", Deadline.PROGRESS)
    assert expired.reason == "no answer to the server's last message"
    assert a.has_room and list(a.handshaking) == ["chatty"]
    (expired,) = a.expire(3.5)
    assert (expired.key, expired.deadline) == ("chatty", Deadline.PROGRESS)


def test_a_trickling_client_is_shed_by_the_handshake_timeout() -> None:
    """Bytes without complete messages are no progress; the overall deadline still applies."""
    a = make(progress_timeout=2.0, handshake_timeout=5.0)
    a.arrive("trickle", 0.0)
    for t in (1.5, 3.0, 4.5):
        a.progressed("trickle", t)
        assert a.expire(t) == []
    (expired,) = a.expire(5.0)
    assert expired.deadline is Deadline.HANDSHAKE


def test_a_waiting_client_gets_its_progress_deadline_only_once_greeted() -> None:
    a = make(shared=1, progress_timeout=1.0, slot_wait=5.0)
    a.arrive("first", 0.0)
    a.negotiated("first")
    a.arrive("waiter", 0.0)
    assert a.expire(4.0) == [], "a client waiting ungreeted was held to a progress deadline"
    a.depart("first", 4.0)
    (expired,) = a.expire(5.0)
    assert (expired.key, expired.deadline) == ("waiter", Deadline.PROGRESS)


def test_stopping_leaves_no_room() -> None:
    a = make()
    a.stop()
    assert not a.has_room
