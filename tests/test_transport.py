"""The asyncio transport (connection.py) driven in memory, without sockets.

As h11's tests drive a connection pair in memory, these hand bytes straight to
a :class:`Connection` through a fake transport and read what it writes back,
under a real event loop (the connection schedules callbacks on it) but with no
socket, thread or timer: admission deadlines are run by the test with an
explicit time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from conformance.wire.constants import Cmd, Errno, Opt, Rep
from conformance.wire.messages import (
    GREETING,
    OPTION_REPLY_HEADER,
    SIMPLE_REPLY,
    pack_client_flags,
    pack_name_and_infos,
    pack_option,
    pack_request,
)
from reference_server import connection as connection_module
from reference_server.backends.memory import MemoryBackend
from reference_server.budget import ByteBudget
from reference_server.connection import Connection
from reference_server.connection_phases import CONNECTION_TRANSITIONS, Phase, Trigger
from reference_server.context import ConnectionContext, Export, OpenConnections, ServerLimits
from reference_server.gate import AdmissionGate
from reference_server.protocol.export import ExportInfo
from reference_server.protocol.phases import LocalProtocolError
from tests.test_phases import SPEC, spec_sections

SIZE = 1 << 20
FIXED_NEWSTYLE = 1  # NBD_FLAG_C_FIXED_NEWSTYLE
NO_ZEROES = 2  # NBD_FLAG_C_NO_ZEROES


class FakeTransport(asyncio.Transport):
    """Collects what the connection writes; delivers what the test sends while reading."""

    def __init__(self, protocol: Connection) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = bytearray()
        self.inbox = bytearray()
        self.reading = True
        self.closed = False
        self.lost = False

    # asyncio.Transport
    def write(self, data: Any) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self._lose)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True
        asyncio.get_running_loop().call_soon(self.deliver)

    def is_reading(self) -> bool:
        return self.reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    # the test's side
    def send(self, data: bytes) -> None:
        self.inbox += data
        self.deliver()

    def deliver(self) -> None:
        while self.inbox and self.reading and not self.closed:
            target = self.protocol.get_buffer(len(self.inbox))
            n = min(len(target), len(self.inbox))
            target[:n] = self.inbox[:n]
            del self.inbox[:n]
            self.protocol.buffer_updated(n)

    def take(self, n: int) -> bytes:
        assert len(self.written) >= n, (
            f"expected {n} bytes from the server, have {len(self.written)}"
        )
        data = bytes(self.written[:n])
        del self.written[:n]
        return data

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)


class Harness:
    """A server context without a server: what a Connection is given, plus its clock."""

    def __init__(self, *, shared: int = 0, persistent: bool = True, **limits: Any) -> None:
        self.limits = ServerLimits(**limits)
        self.stopped: list[str] = []
        admission = self.limits.admission(shared=shared, persistent=persistent)
        self.time = 1000.0  # the admission clock: moved by the test, never by the loop
        self.gate = AdmissionGate(
            admission, lambda: self.stopped.append("last client left"), clock=lambda: self.time
        )
        self.backend = MemoryBackend(SIZE)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.context = ConnectionContext(
            exports={"": Export(ExportInfo(name="", size=SIZE), self.backend)},
            limits=self.limits,
            admission=self.gate,
            budget=ByteBudget(self.limits.max_inflight_bytes),
            executor=self.executor,
            connections=OpenConnections(),
        )
        self._numbers = 0

    def connect(self) -> tuple[Connection, FakeTransport]:
        self._numbers += 1
        connection = Connection(self.context, self._numbers)
        transport = FakeTransport(connection)
        connection.connection_made(transport)
        return connection, transport

    def advance(self, seconds: float) -> None:
        """Move the admission clock and act on the deadlines it passes."""
        self.time += seconds
        self.gate.run_deadlines(self.time)

    def close(self) -> None:
        self.gate.close()
        self.executor.shutdown(wait=True)


def run(scenario: Callable[[Harness], Awaitable[None]], **options: Any) -> None:
    async def main() -> None:
        harness = Harness(**options)
        try:
            await scenario(harness)
        finally:
            harness.close()

    asyncio.run(main())


async def settle() -> None:
    """Let callbacks the connection scheduled (call_soon) run; no time passes."""
    for _ in range(5):
        await asyncio.sleep(0)


def greeted(t: FakeTransport) -> None:
    magic, option_magic, _flags = GREETING.unpack(t.take(GREETING.size))
    assert (magic, option_magic) == (0x4E42444D41474943, 0x49484156454F5054)


def option_replies(t: FakeTransport) -> Iterator[tuple[int, int, bytes]]:
    """(option, reply type, data) of each complete option reply written so far."""
    while len(t.written) >= OPTION_REPLY_HEADER.size:
        _, option, rep, length = OPTION_REPLY_HEADER.unpack(t.written[: OPTION_REPLY_HEADER.size])
        t.take(OPTION_REPLY_HEADER.size)
        yield option, rep, t.take(length)


def go(t: FakeTransport) -> None:
    """Client flags and NBD_OPT_GO on the default export; expect INFO then ACK."""
    t.send(pack_client_flags(FIXED_NEWSTYLE | NO_ZEROES))
    t.send(pack_option(Opt.GO, pack_name_and_infos(b"")))
    types = [rep for _, rep, _ in option_replies(t)]
    assert types[-1] == Rep.ACK, f"expected NBD_OPT_GO to end with ACK, got {types}"


def simple_reply(t: FakeTransport, data_length: int = 0) -> tuple[int, int, bytes]:
    magic, error, cookie = SIMPLE_REPLY.unpack(t.take(SIMPLE_REPLY.size))
    assert magic == 0x67446698
    return error, cookie, t.take(data_length) if not error else b""


# ------------------------------------------------------------------- phases


def test_every_connection_transition_cites_a_heading_path_of_the_spec() -> None:
    sections = spec_sections(SPEC)
    for row in CONNECTION_TRANSITIONS.transitions:
        parts = tuple(row.section.split(" / "))
        ok = parts in sections or (parts[:-1] in sections and parts[-1] in sections[parts[:-1]])
        assert ok, f"{row.source.name} + {row.trigger.name} cites {row.section!r}"


def test_moves_outside_the_table_are_bugs() -> None:
    table = CONNECTION_TRANSITIONS
    with pytest.raises(LocalProtocolError):
        table.target(Phase.HANDSHAKE, Trigger.DISCONNECT)
    with pytest.raises(LocalProtocolError):
        table.target(Phase.CLOSED, Trigger.ADMITTED)
    assert all(table.target(p, Trigger.CLOSE) is Phase.CLOSED for p in Phase)


# ---------------------------------------------------------------- handshake


def test_greeting_negotiation_and_a_write_read_round_trip() -> None:
    async def scenario(h: Harness) -> None:
        c, t = h.connect()
        assert c.phase is Phase.HANDSHAKE
        greeted(t)
        go(t)
        assert c.phase is Phase.TRANSMISSION
        assert not h.gate.admission.handshaking, "still counted as negotiating"
        t.send(pack_request(Cmd.WRITE, 4096, 5, cookie=1, payload=b"hello"))
        assert simple_reply(t)[:2] == (Errno.OK, 1)
        t.send(pack_request(Cmd.READ, 4096, 5, cookie=2))
        assert simple_reply(t, 5) == (Errno.OK, 2, b"hello")

    run(scenario)


def test_disc_drains_then_closes_and_reads_nothing_after_it() -> None:
    async def scenario(h: Harness) -> None:
        c, t = h.connect()
        greeted(t)
        go(t)
        write = pack_request(Cmd.WRITE, 0, 3, cookie=7, payload=b"abc")
        after = pack_request(Cmd.WRITE, 8, 3, cookie=8, payload=b"xyz")
        t.send(write + pack_request(Cmd.DISC, 0, 0) + after)
        assert simple_reply(t)[:2] == (Errno.OK, 7)
        assert c.phase is Phase.CLOSED and t.closed
        assert t.written == b"", "a request after NBD_CMD_DISC was answered"
        assert h.backend.pread(3, 8) == b"\0\0\0", "a request after NBD_CMD_DISC was served"
        await settle()
        assert t.lost and not len(h.context.connections)

    run(scenario)


def test_server_shutdown_answers_new_requests_with_eshutdown() -> None:
    async def scenario(h: Harness) -> None:
        c, t = h.connect()
        greeted(t)
        go(t)
        c.begin_shutdown()
        assert c.phase is Phase.SHUTTING_DOWN
        t.send(pack_request(Cmd.READ, 0, 512, cookie=3))
        assert simple_reply(t)[:2] == (Errno.ESHUTDOWN, 3)
        c.begin_shutdown()  # a second signal changes nothing
        assert c.phase is Phase.SHUTTING_DOWN

    run(scenario)


def test_shutdown_closes_a_negotiating_client() -> None:
    async def scenario(h: Harness) -> None:
        c, t = h.connect()
        c.begin_shutdown()
        assert c.phase is Phase.CLOSED and t.closed

    run(scenario)


def test_handshake_deadline_closes_a_silent_client_but_not_a_served_one() -> None:
    async def scenario(h: Harness) -> None:
        silent, st = h.connect()
        served, vt = h.connect()
        greeted(vt)
        go(vt)
        h.advance(5.1)
        assert silent.phase is Phase.CLOSED and st.closed
        assert served.phase is Phase.TRANSMISSION and not vt.closed

    run(scenario, handshake_timeout=5.0)


def test_progress_deadline_sheds_the_silent_and_keeps_the_one_that_answers() -> None:
    async def scenario(h: Harness) -> None:
        silent, st = h.connect()
        answering, at = h.connect()
        greeted(at)
        at.send(pack_client_flags(FIXED_NEWSTYLE | NO_ZEROES))
        for step in range(1, 6):
            # Each option comes before the client's 1 s turn runs out, and its
            # clock restarts from the answer; the silent client's does not.
            h.advance(0.9)
            at.send(pack_option(Opt.LIST))
            assert [rep for _, rep, _ in option_replies(at)][-1] == Rep.ACK
            assert answering.phase is Phase.HANDSHAKE, f"shed after {step} answered options"
        assert silent.phase is Phase.CLOSED and st.closed
        assert h.gate.admission.handshaking.keys() == {answering}

    run(scenario, handshake_progress_timeout=1.0, handshake_timeout=30.0)


def test_newcomers_beyond_max_handshaking_evict_nobody() -> None:
    async def scenario(h: Harness) -> None:
        first, ft = h.connect()
        greeted(ft)
        assert not h.gate.has_room
        crowd = [h.connect() for _ in range(5)]  # as socket activation may hand them over
        await settle()
        assert first.phase is Phase.HANDSHAKE and not ft.closed
        go(ft)
        assert first.phase is Phase.TRANSMISSION
        assert all(c.phase is Phase.HANDSHAKE for c, _ in crowd)

    run(scenario, max_handshaking=1)


def test_hard_disconnect_mid_payload_gives_the_budget_back() -> None:
    async def scenario(h: Harness) -> None:
        c, t = h.connect()
        greeted(t)
        go(t)
        t.send(pack_request(Cmd.WRITE, 0, 65536, cookie=1) + b"\xee" * 1000)
        assert h.context.budget.used == 65536
        t.close()
        await settle()
        assert h.context.budget.used == 0
        assert c.phase is Phase.CLOSED

    run(scenario)


# ----------------------------------------------------------------- admission


def test_a_client_beyond_shared_waits_ungreeted_and_is_greeted_when_a_slot_frees() -> None:
    async def scenario(h: Harness) -> None:
        _, ft = h.connect()
        second, sec = h.connect()
        assert second.phase is Phase.WAITING_FOR_SLOT and sec.written == b""
        sec.send(pack_client_flags(FIXED_NEWSTYLE | NO_ZEROES))  # early bytes are kept
        ft.close()
        await settle()
        assert second.phase is Phase.HANDSHAKE
        greeted(sec)
        sec.send(pack_option(Opt.GO, pack_name_and_infos(b"")))
        assert [rep for _, rep, _ in option_replies(sec)][-1] == Rep.ACK
        assert h.stopped == []

    run(scenario, shared=1, persistent=False)


def test_a_wait_that_runs_out_is_refused_with_err_policy() -> None:
    async def scenario(h: Harness) -> None:
        h.connect()
        second, sec = h.connect()
        h.advance(1.0)
        assert second.phase is Phase.HANDSHAKE
        greeted(sec)
        sec.send(pack_client_flags(FIXED_NEWSTYLE | NO_ZEROES))
        sec.send(pack_option(Opt.GO, pack_name_and_infos(b"")))
        (reply,) = list(option_replies(sec))
        assert reply[1] == Rep.ERR_POLICY, f"expected NBD_REP_ERR_POLICY, got {reply[1]}"

    run(scenario, shared=1, slot_wait=0.5)


def test_the_last_client_leaving_stops_a_server_that_is_not_persistent() -> None:
    async def scenario(h: Harness) -> None:
        _, t = h.connect()
        greeted(t)
        go(t)
        t.send(pack_request(Cmd.DISC, 0, 0))
        await settle()
        assert h.stopped == ["last client left"]

    run(scenario, persistent=False)


def test_replies_wait_while_the_client_does_not_read_and_all_leave_after() -> None:
    async def scenario(h: Harness) -> None:
        c, t = h.connect()
        greeted(t)
        go(t)
        c.pause_writing()  # what asyncio calls when the socket buffer is full
        for i in range(4):
            t.send(pack_request(Cmd.READ, 0, 65536, cookie=i))
        assert t.written == b"", "a reply was written while the transport asked us to wait"
        c.resume_writing()
        for i in range(4):
            assert simple_reply(t, 65536)[:2] == (Errno.OK, i)
        assert h.context.budget.used == 0

    run(scenario)


def test_requests_held_back_by_large_replies_run_once_those_leave_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Replies beyond MAX_UNSENT hold the next requests back; a socket that
    # takes them all at once sends no resume_writing(), and the held-back
    # requests must still run (found by fio: 32 MiB reads at iodepth 2 hung).
    monkeypatch.setattr(connection_module, "MAX_UNSENT", 65536)

    async def scenario(h: Harness) -> None:
        _, t = h.connect()
        greeted(t)
        go(t)
        t.send(b"".join(pack_request(Cmd.READ, 0, 131072, cookie=i) for i in range(3)))
        await settle()
        for i in range(3):
            assert simple_reply(t, 131072)[:2] == (Errno.OK, i), f"read {i} never answered"
        assert h.context.budget.used == 0

    run(scenario)
