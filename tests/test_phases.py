"""The transition tables of the sans-IO core (protocol/phases.py).

Every row of each table is taken by some client byte stream (so the table
holds no dead transitions), every pair the table does not list raises
LocalProtocolError without moving the phase, and a table cannot list a pair
twice.  Client bytes are built here with ``struct`` from proto.md.
"""

from __future__ import annotations

import itertools
import re
import struct
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path

import pytest

from reference_server.protocol.constants import Command, Info, Option
from reference_server.protocol.events import Close, EnterTransmission, NeedData, StartTLS
from reference_server.protocol.events import Request as RequestEvent
from reference_server.protocol.export import ExportInfo
from reference_server.protocol.handshake import Handshake
from reference_server.protocol.phases import (
    HANDSHAKE_TRANSITIONS,
    TABLES,
    TRANSMISSION_TRANSITIONS,
    HandshakePhase,
    HandshakeTrigger,
    LocalProtocolError,
    PhaseMachine,
    Transition,
    TransitionTable,
    TransmissionPhase,
    TransmissionTrigger,
)
from reference_server.protocol.transmission import Transmission

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
SIZE = 1 << 20
EXPORTS = {"": ExportInfo("", SIZE)}
SPEC = Path(__file__).resolve().parents[1] / "docs" / "spec" / "proto.md"
Taken = list[tuple[str, Enum, Enum]]


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[Taken]:
    """Every (table, phase, trigger) a PhaseMachine fires while the test runs."""
    record: Taken = []
    fire = PhaseMachine.fire

    def recording(self: PhaseMachine[Enum, Enum], trigger: Enum) -> Enum:
        source = self.phase
        target = fire(self, trigger)
        record.append((self.table.title, source, trigger))
        return target

    monkeypatch.setattr(PhaseMachine, "fire", recording)
    yield record


def option(number: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, number, len(data)) + data


GO = option(Option.GO, struct.pack(">IH", 0, 0))


def handshake(data: bytes, *, tls: bool = False) -> tuple[Handshake, object]:
    hs = Handshake(EXPORTS, tls_available=tls)
    hs.receive_data(data)
    return hs, hs.next_event()


def transmission() -> Transmission:
    _, event = handshake(struct.pack(">I", 3) + GO)
    assert isinstance(event, EnterTransmission)
    return Transmission(event.negotiated)


def request(command: int, offset: int = 0, length: int = 0, cookie: int = 1) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, cookie, offset, length)


def _client_flags_accepted_then_go() -> None:
    hs, event = handshake(struct.pack(">I", 3) + GO)
    assert isinstance(event, EnterTransmission)
    assert hs.phase is HandshakePhase.FINISHED


def _client_flags_refused() -> None:
    hs, event = handshake(struct.pack(">I", 3 | 1 << 7))
    assert isinstance(event, Close) and not event.clean
    assert hs.phase is HandshakePhase.CLOSED


def _starttls_then_tls_established() -> None:
    hs, event = handshake(struct.pack(">I", 3) + option(Option.STARTTLS), tls=True)
    assert isinstance(event, StartTLS)
    assert hs.phase is HandshakePhase.TLS_PENDING
    hs.tls_established()
    assert hs.phase is HandshakePhase.HAGGLING


def _export_name() -> None:
    hs, event = handshake(struct.pack(">I", 3) + option(Option.EXPORT_NAME))
    assert isinstance(event, EnterTransmission)
    assert hs.phase is HandshakePhase.FINISHED


def _abort() -> None:
    hs, event = handshake(struct.pack(">I", 3) + option(Option.ABORT))
    assert isinstance(event, Close) and event.clean
    assert hs.phase is HandshakePhase.CLOSED


def _bad_option_magic() -> None:
    hs, event = handshake(struct.pack(">I", 3) + struct.pack(">QII", 1, Option.GO, 0))
    assert isinstance(event, Close) and not event.clean
    assert hs.phase is HandshakePhase.CLOSED


def _write_payload_arrives_later() -> None:
    tx = transmission()
    tx.receive_data(request(Command.WRITE, 0, 4))
    assert isinstance(tx.next_event(), NeedData)
    assert tx.phase is TransmissionPhase.RECEIVING_PAYLOAD
    tx.receive_data(b"abcd")
    event = tx.next_event()
    assert isinstance(event, RequestEvent) and bytes(event.payload) == b"abcd"
    assert tx.phase is TransmissionPhase.AWAITING_REQUEST


def _rejected_write_payload_arrives_later() -> None:
    tx = transmission()
    tx.receive_data(request(Command.WRITE, SIZE, 4))  # beyond the end: ENOSPC
    assert isinstance(tx.next_event(), NeedData)
    assert not tx.data_to_send(), "the rejected write was answered before its payload was read"
    assert tx.phase is TransmissionPhase.DISCARDING_PAYLOAD
    tx.receive_data(b"abcd" + request(Command.FLUSH))
    assert tx.phase is TransmissionPhase.AWAITING_REQUEST
    assert tx.data_to_send(), "the rejected write was not answered once its payload was read"
    event = tx.next_event()
    assert isinstance(event, RequestEvent) and event.header.command == Command.FLUSH


def _disc() -> None:
    tx = transmission()
    tx.receive_data(request(Command.DISC))
    event = tx.next_event()
    assert isinstance(event, Close) and event.clean
    assert tx.phase is TransmissionPhase.CLOSED


def _bad_request_magic() -> None:
    tx = transmission()
    tx.receive_data(struct.pack(">IHHQQI", 0x12345678, 0, Command.READ, 1, 0, 512))
    event = tx.next_event()
    assert isinstance(event, Close) and not event.clean
    assert tx.phase is TransmissionPhase.CLOSED


def _payload_too_large() -> None:
    tx = transmission()
    tx.receive_data(request(Command.WRITE, 0, (1 << 25) + 1))
    event = tx.next_event()
    assert isinstance(event, Close) and not event.clean
    assert tx.phase is TransmissionPhase.CLOSED


SCENARIOS: list[Callable[[], None]] = [
    _client_flags_accepted_then_go,
    _client_flags_refused,
    _starttls_then_tls_established,
    _export_name,
    _abort,
    _bad_option_magic,
    _write_payload_arrives_later,
    _rejected_write_payload_arrives_later,
    _disc,
    _bad_request_magic,
    _payload_too_large,
]


def test_every_transition_is_taken_by_some_client(taken: Taken) -> None:
    for scenario in SCENARIOS:
        scenario()
    seen = set(taken)
    for table in TABLES:
        rows = {(table.title, t.source, t.trigger) for t in table.transitions}
        missing = rows - seen
        assert not missing, f"{table.title}: transitions no scenario takes: {missing}"
    # The scenarios fired nothing outside the tables (that would have raised).
    assert seen <= {(t.title, r.source, r.trigger) for t in TABLES for r in t.transitions}


def test_every_phase_but_the_initial_one_is_entered() -> None:
    for table in TABLES:
        entered = {t.target for t in table.transitions} | {table.initial}
        assert entered == set(table.phases), f"{table.title}: phases never entered"


def _illegal_pairs() -> Iterator[tuple[TransitionTable[Enum, Enum], Enum, Enum]]:
    tables: list[tuple[TransitionTable[Enum, Enum], type[Enum]]] = [
        (HANDSHAKE_TRANSITIONS, HandshakeTrigger),  # type: ignore[list-item]
        (TRANSMISSION_TRANSITIONS, TransmissionTrigger),  # type: ignore[list-item]
    ]
    for table, triggers in tables:
        listed = {(t.source, t.trigger) for t in table.transitions}
        for phase, trigger in itertools.product(table.phases, triggers):
            if (phase, trigger) not in listed:
                yield table, phase, trigger


@pytest.mark.parametrize(
    ("table", "phase", "trigger"),
    list(_illegal_pairs()),
    ids=lambda v: getattr(v, "name", getattr(v, "title", None)),
)
def test_a_transition_not_in_the_table_raises_and_changes_nothing(
    table: TransitionTable[Enum, Enum], phase: Enum, trigger: Enum
) -> None:
    machine = PhaseMachine(table)
    machine._phase = phase  # place the machine; only the test does this
    with pytest.raises(LocalProtocolError, match=f"{trigger.name} is not allowed in {phase.name}"):
        machine.fire(trigger)
    assert machine.phase is phase


def test_a_closed_transmission_refuses_every_trigger() -> None:
    tx = transmission()
    tx.receive_data(request(Command.DISC))
    assert isinstance(tx.next_event(), Close)
    for trigger in TransmissionTrigger:
        with pytest.raises(LocalProtocolError):
            tx._phases.fire(trigger)
    assert tx.phase is TransmissionPhase.CLOSED


def test_a_table_cannot_list_a_pair_twice() -> None:
    row = Transition(
        HandshakePhase.HAGGLING, HandshakeTrigger.ABORT_RECEIVED, HandshakePhase.CLOSED, "x"
    )
    with pytest.raises(ValueError, match="HAGGLING \\+ ABORT_RECEIVED listed twice"):
        TransitionTable("t", HandshakePhase.HAGGLING, [row, row])


def spec_sections(path: Path) -> dict[tuple[str, ...], str]:
    """{heading path below the title: its text} for every heading of a Markdown spec."""
    sections: dict[tuple[str, ...], str] = {}
    stack: list[str] = []
    current: tuple[str, ...] = ()
    for line in path.read_text().splitlines():
        match = re.match(r"(#{2,6})\s+(.*?)\s*$", line)
        if match:
            del stack[len(match.group(1)) - 2 :]
            stack.append(match.group(2))
            current = tuple(stack)
            sections[current] = ""
        elif current:
            for depth in range(1, len(current) + 1):
                sections[current[:depth]] += line.replace("`", "") + "\n"
    return sections


def test_every_transition_cites_a_heading_path_of_the_spec() -> None:
    sections = spec_sections(SPEC)
    for table in TABLES:
        for row in table.transitions:
            parts = tuple(row.section.split(" / "))
            # The full path is a heading, or its last part is an item of one.
            ok = parts in sections or (parts[:-1] in sections and parts[-1] in sections[parts[:-1]])
            assert ok, f"{table.title}: {row.source.name} + {row.trigger.name}: {row.section!r}"


def test_info_request_does_not_leave_haggling() -> None:
    hs, event = handshake(
        struct.pack(">I", 3) + option(Option.INFO, struct.pack(">IHH", 0, 1, Info.NAME))
    )
    assert isinstance(event, NeedData)
    assert hs.phase is HandshakePhase.HAGGLING
