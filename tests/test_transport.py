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
from reference_server.backends.base import Backend
from reference_server.backends.memory import PAGE_SIZE, MemoryBackend
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

    def __init__(
        self,
        *,
        shared: int = 0,
        persistent: bool = True,
        backend: Backend | None = None,
        **limits: Any,
    ) -> None:
        self.limits = ServerLimits(**limits)
        self.stopped: list[str] = []
        admission = self.limits.admission(shared=shared, persistent=persistent)
        self.time = 1000.0  # the admission clock: moved by the test, never by the loop
        self.gate = AdmissionGate(
            admission, lambda: self.stopped.append("last client left"), clock=lambda: self.time
        )
        self.backend = backend or MemoryBackend(SIZE)
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


class BufferedMemory(MemoryBackend):
    """A memory backend that offers no view: payloads are buffered, then pwritten."""

    def write_view(self, length: int, offset: int) -> memoryview | None:
        return None


class InStoreOnly(MemoryBackend):
    """A memory backend whose writes must all be received in place (pwrite is a bug)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.views: list[tuple[int, int]] = []
        self.commits: list[tuple[int, int, bool]] = []

    def write_view(self, length: int, offset: int) -> memoryview | None:
        self.views.append((length, offset))
        return super().write_view(length, offset)

    def commit_write(self, length: int, offset: int, fua: bool) -> None:
        self.commits.append((length, offset, fua))
        super().commit_write(length, offset, fua)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
        raise AssertionError("a payload received in place was copied again")


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

    run(scenario, backend=BufferedMemory(SIZE))


# ------------------------------------------------- writes received in place


def send_in_pieces(t: FakeTransport, data: bytes, piece: int) -> None:
    """Deliver DATA a few bytes at a time, as many small recv calls would."""
    for start in range(0, len(data), piece):
        t.send(data[start : start + piece])


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20], ids=lambda n: f"{n}-byte-reads")
def test_a_write_payload_lands_in_the_store_without_a_buffer(piece: int) -> None:
    data = bytes(i % 251 for i in range(3 * PAGE_SIZE + 5))
    backend = InStoreOnly(SIZE)

    async def scenario(h: Harness) -> None:
        _, t = h.connect()
        greeted(t)
        go(t)
        offset = PAGE_SIZE - 3
        request = pack_request(Cmd.WRITE, offset, len(data), cookie=1, payload=data)
        send_in_pieces(t, request, piece)
        assert h.context.budget.used == 0, "a payload received in place costs no budget"
        assert simple_reply(t)[:2] == (Errno.OK, 1)
        assert backend.views == [(len(data), offset)]
        assert backend.commits == [(len(data), offset, False)]
        assert backend.pread(len(data), offset) == data
        t.send(pack_request(Cmd.READ, offset, len(data), cookie=2))
        assert simple_reply(t, len(data)) == (Errno.OK, 2, data)
        assert t.written == b""

    run(scenario, backend=backend)


def test_pipelined_writes_that_arrive_with_their_headers_land_in_place() -> None:
    backend = InStoreOnly(SIZE)

    async def scenario(h: Harness) -> None:
        _, t = h.connect()
        greeted(t)
        go(t)
        writes = [(i * 5000, bytes([i + 1]) * (100 + i)) for i in range(8)]
        burst = b"".join(
            pack_request(Cmd.WRITE, off, len(data), cookie=i, payload=data, flags=1)  # FUA
            for i, (off, data) in enumerate(writes)
        )
        t.send(burst)  # one recv: every header with its payload
        for i in range(len(writes)):
            assert simple_reply(t)[:2] == (Errno.OK, i)
        assert [c[2] for c in backend.commits] == [True] * len(writes), "FUA reaches the commit"
        for off, data in writes:
            assert backend.pread(len(data), off) == data

    run(scenario, backend=backend)


def test_a_write_cut_off_mid_payload_leaves_its_prefix_and_nothing_else() -> None:
    # The lead's decision (Backend.write_view): the part that arrived stays;
    # the write never completed, so nothing was promised about its range.
    backend = InStoreOnly(SIZE)

    async def scenario(h: Harness) -> None:
        _, g = h.connect()
        greeted(g)
        go(g)
        g.send(pack_request(Cmd.WRITE, 0, 4096, cookie=1, payload=b"\x11" * 4096))
        assert simple_reply(g)[:2] == (Errno.OK, 1)
        c, t = h.connect()
        greeted(t)
        go(t)
        offset = 4 * PAGE_SIZE - 10
        t.send(pack_request(Cmd.WRITE, offset, 65536, cookie=1) + b"\xee" * 1000)
        t.close()
        await settle()
        assert c.phase is Phase.CLOSED and h.context.budget.used == 0
        assert backend.pread(1000, offset) == b"\xee" * 1000, "the prefix that arrived"
        assert backend.pread(65536 - 1000, offset + 1000) == bytes(65536 - 1000)
        assert backend.pread(4096, 0) == b"\x11" * 4096, "the rest of the store is intact"
        # The prefix is committed: its pages are data, never holes claiming zeroes.
        assert backend.commits == [(4096, 0, False), (1000, offset, False)]
        first = offset // PAGE_SIZE * PAGE_SIZE
        assert backend.extents(PAGE_SIZE, first)[0].flags == 0
        # The other client, and a new one, are served as before.
        g.send(pack_request(Cmd.READ, offset, 1000, cookie=2))
        assert simple_reply(g, 1000) == (Errno.OK, 2, b"\xee" * 1000)
        _, n = h.connect()
        greeted(n)
        go(n)
        n.send(pack_request(Cmd.READ, 0, 4096, cookie=3))
        assert simple_reply(n, 4096) == (Errno.OK, 3, b"\x11" * 4096)

    run(scenario, backend=backend)


@pytest.mark.parametrize("why", ["beyond-the-end", "bad-flag"])
def test_a_rejected_write_is_discarded_and_never_touches_the_store(why: str) -> None:
    backend = InStoreOnly(SIZE)

    async def scenario(h: Harness) -> None:
        _, t = h.connect()
        greeted(t)
        go(t)
        offset, flags = (SIZE - 100, 0) if why == "beyond-the-end" else (0, 1 << 10)
        send_in_pieces(
            t, pack_request(Cmd.WRITE, offset, 4096, cookie=1, flags=flags) + b"\xee" * 4096, 1000
        )
        error, cookie, _ = simple_reply(t)
        assert cookie == 1 and error in (Errno.ENOSPC, Errno.EINVAL)
        assert backend.views == [], "a store view was asked for a rejected write"
        assert backend.pread(SIZE, 0) == bytes(SIZE)
        t.send(pack_request(Cmd.WRITE, 0, 3, cookie=2, payload=b"abc"))
        assert simple_reply(t)[:2] == (Errno.OK, 2), "the payload was not skipped exactly"

    run(scenario, backend=backend)


def test_a_write_begun_before_shutdown_completes_and_one_after_is_refused() -> None:
    backend = InStoreOnly(SIZE)

    async def scenario(h: Harness) -> None:
        c, t = h.connect()
        greeted(t)
        go(t)
        t.send(pack_request(Cmd.WRITE, 0, 4096, cookie=1) + b"\x01" * 100)
        c.begin_shutdown()
        t.send(b"\x01" * 3996)
        assert simple_reply(t)[:2] == (Errno.OK, 1), "its bytes are in the store: it ran"
        t.send(pack_request(Cmd.WRITE, 8192, 4096, cookie=2, payload=b"\x02" * 4096))
        assert simple_reply(t)[:2] == (Errno.ESHUTDOWN, 2)
        assert backend.pread(4096, 0) == b"\x01" * 4096
        assert backend.pread(4096, 8192) == bytes(4096), "a refused write landed"
        assert backend.views == [(4096, 0)]

    run(scenario, backend=backend)


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
