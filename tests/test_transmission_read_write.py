"""READ, WRITE, FLUSH, DISC and the maximum payload.

Also requests split or pipelined across receive_data() calls.  Unit tests of
protocol/transmission.py, driven by tests/transmission_driver.py.
"""

from __future__ import annotations

import pytest

from reference_server.backends.base import Extent
from reference_server.backends.memory import PAGE_SIZE, MemoryBackend
from reference_server.dispatch import execute
from reference_server.protocol.constants import ChunkType, Command, Errno, StateFlag
from reference_server.protocol.events import NeedData
from reference_server.protocol.events import Request as RequestEvent
from reference_server.protocol.export import BlockSizes, ExportInfo
from tests.transmission_driver import (
    DF,
    FUA,
    NO_HOLE,
    PATTERN,
    PAYLOAD_LEN,
    SIZE,
    Conn,
    conn,
    negotiate,
)

# -------------------------------------------------------------------- READ


def test_simple_read_returns_written_data() -> None:
    c = conn()
    assert c.write(1000, PATTERN) == 0
    assert c.read(1000, len(PATTERN)) == PATTERN
    assert c.read(0, 1000) == bytes(1000)


def test_structured_read_sends_offset_data_and_offset_hole_chunks() -> None:
    c = conn(structured=True)
    assert c.write(0, PATTERN) == 0  # page 0 becomes data; the rest stays a hole
    length = 3 * PAGE_SIZE
    replies = c.call(Command.READ, 0, length)
    types = [r.type for r in replies]
    assert ChunkType.OFFSET_DATA in types and ChunkType.OFFSET_HOLE in types
    for r in replies:
        if r.type == ChunkType.OFFSET_HOLE:
            assert len(r.payload) == 12  # 64-bit offset, 32-bit hole size
    expected = PATTERN + bytes(length - len(PATTERN))
    assert c.read(0, length) == expected


def test_structured_read_with_df_sends_one_content_chunk_with_explicit_zeroes() -> None:
    # "If the area being read contains both data and a hole, the server MUST use
    # NBD_REPLY_TYPE_OFFSET_DATA with the zeroes explicitly present."
    c = conn(structured=True)
    c.write(PAGE_SIZE, PATTERN)
    length = 65536  # DF MUST be supported up to 64 KiB
    replies = c.call(Command.READ, 0, length, flags=DF)
    content = [r for r in replies if r.type in (ChunkType.OFFSET_DATA, ChunkType.OFFSET_HOLE)]
    assert [r.type for r in content] == [ChunkType.OFFSET_DATA]
    expected = bytes(PAGE_SIZE) + PATTERN + bytes(length - PAGE_SIZE - len(PATTERN))
    assert c.read(0, length, DF) == expected


def test_structured_read_of_a_whole_hole() -> None:
    c = conn(structured=True)
    assert c.read(4096, 8192) == bytes(8192)


def test_zero_length_read_gets_a_reply_and_no_disconnect() -> None:
    for kw in ({}, {"structured": True}):
        c = conn(None, **kw)
        c.call(Command.READ, 0, 0)
        assert c.closed is None


def test_read_past_the_end_is_einval() -> None:
    for kw in ({}, {"structured": True}, {"extended": True}):
        c = conn(None, **kw)
        assert c.error_of(Command.READ, SIZE - 512, 1024) == Errno.EINVAL
        assert c.error_of(Command.READ, SIZE, 1) == Errno.EINVAL
        assert c.error_of(Command.READ, (1 << 64) - 1, 1) == Errno.EINVAL
        assert c.read(SIZE - 512, 512) == bytes(512)


def test_structured_read_errors_are_structured_even_for_early_einval() -> None:
    # "MUST NOT use a simple reply for NBD_CMD_READ (even for the case of an
    # early NBD_EINVAL due to bad flags)".
    c = conn(structured=True)
    [reply] = c.call(Command.READ, 0, 512, flags=NO_HOLE)
    assert not reply.simple
    err, message = reply.error_chunk()
    assert err == Errno.EINVAL and message


def test_read_cookies_are_echoed_verbatim() -> None:
    c = conn(structured=True)
    for cookie in (0, 1, 0xFFFFFFFFFFFFFFFF, 0x0123456789ABCDEF):
        replies = c.parse(c.feed(c.request(Command.READ, 0, 16, cookie=cookie)))
        assert {r.cookie for r in replies} == {cookie}


# ------------------------------------------------------------ max payload


def test_structured_read_above_max_payload_is_eoverflow() -> None:
    export = ExportInfo("", SIZE, block_sizes=BlockSizes(1, 4096, 65536))
    c = conn(export, structured=True)
    assert c.error_of(Command.READ, 0, 65536 + 4096) == Errno.EOVERFLOW
    assert c.read(0, 65536) == bytes(65536)


def test_simple_read_above_max_payload_is_einval_not_eoverflow() -> None:
    export = ExportInfo("", SIZE, block_sizes=BlockSizes(1, 4096, 65536))
    c = conn(export)
    assert c.error_of(Command.READ, 0, 65536 + 4096) == Errno.EINVAL


def test_write_above_max_payload_is_einval_and_payload_is_consumed() -> None:
    export = ExportInfo("", SIZE, block_sizes=BlockSizes(1, 4096, 65536))
    c = conn(export)
    assert c.write(0, bytes(65536 + 1)) == Errno.EINVAL
    assert c.read(0, 16) == bytes(16)


@pytest.mark.parametrize("kw", [{}, {"structured": True}])
def test_no_other_error_is_eoverflow(kw: dict[str, bool]) -> None:
    # "The server SHOULD NOT return NBD_EOVERFLOW except as documented".
    c = conn(None, **kw)
    seen = {
        c.write(SIZE, b"x"),
        c.error_of(Command.READ, SIZE, 1),
        c.error_of(Command.TRIM, 0, SIZE + 1),
        c.error_of(Command.WRITE_ZEROES, 0, SIZE + 1),
        c.error_of(Command.CACHE, 0, SIZE + 1),
        c.error_of(Command.READ, 0, 16, flags=1 << 9),
    }
    assert Errno.EOVERFLOW not in seen


def test_write_payload_above_32m_disconnects_without_waiting_for_it() -> None:
    # "Size constraints": a payload this large may be deemed a denial of service.
    c = conn()
    header = c.request(Command.WRITE, 0, (1 << 25) + 1)
    assert c.feed(header) == b""
    assert c.closed is not None and not c.closed.clean


# ------------------------------------------------------------------- WRITE


def test_write_with_fua_then_read() -> None:
    c = conn()
    assert c.write(4096, PATTERN, FUA) == 0
    assert c.read(4096, len(PATTERN)) == PATTERN


def test_write_past_the_end_is_enospc_and_payload_is_consumed() -> None:
    c = conn()
    assert c.write(SIZE - 100, PATTERN) == Errno.ENOSPC
    assert c.write(1 << 62, b"abc") == Errno.ENOSPC
    assert c.read(SIZE - 100, 100) == bytes(100), "a refused write changed the export"


def test_write_on_read_only_is_eperm() -> None:
    c = conn(ExportInfo("", SIZE, read_only=True))
    assert c.write(0, PATTERN) == Errno.EPERM
    assert c.write(0, PATTERN, FUA) == Errno.EPERM
    assert c.read(0, 16) == bytes(16)


def test_pipelined_requests_in_one_read_are_all_answered() -> None:
    c = conn()
    data = b"".join(
        [
            c.request(Command.WRITE, 0, 4, data=b"abcd"),
            c.request(Command.READ, 0, 4),
            c.request(Command.FLUSH),
            c.request(Command.READ, 2, 2),
        ]
    )
    replies = c.parse(c.feed(data))
    assert [r.error for r in replies] == [0, 0, 0, 0]
    assert [r.payload for r in replies] == [b"", b"abcd", b"", b"cd"]


def test_receive_data_accepts_bytearray_and_memoryview() -> None:
    c = conn()
    raw = c.request(Command.WRITE, 0, 4, data=b"abcd")
    c.tx.receive_data(bytearray(raw[:10]))
    c.tx.receive_data(memoryview(raw)[10:])
    event = c.tx.next_event()
    assert isinstance(event, RequestEvent) and bytes(event.payload) == b"abcd"


def test_request_split_into_single_bytes() -> None:
    c = conn()
    data = c.request(Command.WRITE, 8, 4, data=b"wxyz")
    for i in range(len(data) - 1):
        assert c.feed(data[i : i + 1]) == b""
    [reply] = c.parse(c.feed(data[-1:]))
    assert reply.error == 0
    assert c.read(8, 4) == b"wxyz"


def test_write_payload_received_through_payload_buffer() -> None:
    # The zero-copy path: the transport reads the payload into payload_buffer().
    c = conn()
    data = bytes(range(256)) * 40
    header = c.request(Command.WRITE, 4096, len(data))
    c.tx.receive_data(header + data[:100])  # some payload arrives with the header
    assert isinstance(c.tx.next_event(), NeedData)
    assert c.tx.pending_payload == len(data)
    pos = 100
    while (view := c.tx.payload_buffer()) is not None:
        n = min(len(view), 1000)
        view[:n] = data[pos : pos + n]
        c.tx.payload_received(n)
        pos += n
        event = c.tx.next_event()
        if pos < len(data):
            assert isinstance(event, NeedData)
    assert pos == len(data)
    assert isinstance(event, RequestEvent)
    assert bytes(event.payload) == data
    assert c.tx.pending_payload == 0
    [reply] = c.parse(b"".join(bytes(b) for b in execute(c.tx.replies, event, c.backend)))
    assert reply.error == 0
    assert c.read(4096, len(data)) == data


# ------------------------------------------------- WRITE received in place


class Targets:
    """A write_target that records what it was asked for, over a backend's views."""

    def __init__(self, c: Conn) -> None:
        self.asked: list[tuple[int, int]] = []
        self._backend = c.backend
        c.tx.write_target = self

    def __call__(self, length: int, offset: int) -> memoryview | None:
        self.asked.append((length, offset))
        return self._backend.write_view(length, offset)


@pytest.mark.parametrize("extended", [False, True])
def test_write_payload_received_into_the_store(extended: bool) -> None:
    c = conn(extended=extended)
    targets = Targets(c)
    data = bytes(range(256)) * 40
    flags = PAYLOAD_LEN if extended else 0
    header = c.request(Command.WRITE, 4096, len(data), flags=flags)
    c.tx.receive_data(header + data[:100])  # some payload arrives with the header
    assert isinstance(c.tx.next_event(), NeedData)
    assert targets.asked == [(len(data), 4096)]
    assert c.tx.pending_payload == 0, "a payload received in place needs no memory"
    assert c.backend.pread(100, 4096) == data[:100], "what came with the header went first"
    pos = 100
    while (view := c.tx.payload_buffer()) is not None:
        n = min(len(view), 999)
        view[:n] = data[pos : pos + n]
        c.tx.payload_received(n)
        pos += n
        assert c.backend.pread(n, 4096 + pos - n) == data[pos - n : pos], "it is the store"
        event = c.tx.next_event()
        if pos < len(data):
            assert isinstance(event, NeedData)
    assert pos == len(data)
    assert isinstance(event, RequestEvent)
    assert event.in_store and event.payload == b""
    [reply] = c.parse(b"".join(bytes(b) for b in execute(c.tx.replies, event, c.backend)))
    assert reply.error == 0
    assert c.read(4096, len(data)) == data


def test_writes_pipelined_in_one_piece_and_byte_by_byte_land_in_the_store() -> None:
    c = conn(structured=True, in_store=True)
    writes = [(i * 3000 + 7, bytes([i + 1]) * (500 + 100 * i)) for i in range(6)]
    stream = b"".join(c.request(Command.WRITE, off, len(d), data=d) for off, d in writes)
    stream += c.request(Command.READ, 7, 3000)
    replies = c.parse(c.feed(stream))
    assert [r.error for r in replies if r.simple] == [0] * len(writes)
    for off, data in writes:
        assert c.backend.pread(len(data), off) == data
    trickle = c.request(Command.WRITE, 100000, 300, data=b"\x55" * 300)
    out = b"".join(c.feed(trickle[i : i + 1]) for i in range(len(trickle)))
    assert [r.error for r in c.parse(out)] == [0]
    assert c.read(100000, 300) == b"\x55" * 300


def test_abandoned_write_reports_the_prefix_that_landed() -> None:
    c = conn(in_store=True)
    c.tx.receive_data(c.request(Command.WRITE, 8192, 4096) + b"\xee" * 10)
    assert isinstance(c.tx.next_event(), NeedData)
    view = c.tx.payload_buffer()
    assert view is not None and len(view) == 4086
    view[:90] = b"\xee" * 90
    c.tx.payload_received(90)
    assert isinstance(c.tx.next_event(), NeedData)
    assert c.tx.abandon_payload() == (100, 8192)
    assert c.tx.abandon_payload() is None, "abandoned once"
    assert c.backend.pread(101, 8192) == b"\xee" * 100 + b"\0"


def test_abandoned_buffered_write_leaves_nothing() -> None:
    c = conn()  # no write_target: the payload goes to a buffer
    c.tx.receive_data(c.request(Command.WRITE, 0, 4096) + b"\xee" * 10)
    assert isinstance(c.tx.next_event(), NeedData)
    assert c.tx.abandon_payload() is None
    assert c.backend.pread(10, 0) == bytes(10)


@pytest.mark.parametrize(
    ("export", "offset", "flags", "error"),
    [
        (ExportInfo("", SIZE, read_only=True), 0, 0, Errno.EPERM),
        (ExportInfo("", SIZE), SIZE - 10, 0, Errno.ENOSPC),
        (ExportInfo("", SIZE), 0, 1 << 12, Errno.EINVAL),
    ],
    ids=["read-only", "beyond-the-end", "unknown-flag"],
)
def test_a_rejected_write_never_asks_for_the_store(
    export: ExportInfo, offset: int, flags: int, error: Errno
) -> None:
    c = conn(export)
    targets = Targets(c)
    data = b"\xee" * 4096
    raw = c.request(Command.WRITE, offset, len(data), flags=flags, data=data)
    out = b"".join(c.feed(raw[i : i + 700]) for i in range(0, len(raw), 700))
    [reply] = c.parse(out)
    assert reply.error == error
    assert targets.asked == [], "a view of the store was asked for a rejected write"
    assert c.backend.pread(SIZE, 0) == bytes(SIZE)
    assert c.tx.abandon_payload() is None


def test_write_payload_split_across_receive_data_calls_then_next_request() -> None:
    c = conn()
    data = b"0123456789" * 500
    stream = c.request(Command.WRITE, 0, len(data), data=data) + c.request(Command.READ, 0, 10)
    replies = []
    for i in range(0, len(stream), 777):
        replies += c.parse(c.feed(stream[i : i + 777]))
    assert [r.error for r in replies] == [0, 0]
    assert replies[1].payload == data[:10]


def test_rejected_write_payload_is_skipped_even_when_it_arrives_late() -> None:
    c = conn(ExportInfo("", SIZE, read_only=True))
    data = b"z" * 5000
    out = c.feed(c.request(Command.WRITE, 0, len(data)))
    # Answered only once its payload is read and dropped: a reply to a request the
    # client is still sending matches none it has issued (libnbd gives up).
    assert c.parse(out) == []
    assert c.parse(c.feed(data[:3000])) == []
    replies = c.parse(c.feed(data[3000:] + c.request(Command.READ, 0, 8)))
    assert [(r.error, bytes(r.payload)) for r in replies] == [(Errno.EPERM, b""), (0, bytes(8))]


# ------------------------------------------------------------ DISC, FLUSH


def test_disc_is_a_clean_close_with_no_reply() -> None:
    c = conn()
    out = c.feed(c.request(Command.DISC) + c.request(Command.READ, 0, 16))
    assert out == b""
    assert c.closed is not None and c.closed.clean
    # Nothing after DISC is read.
    c.tx.receive_data(c.request(Command.READ, 0, 16))
    assert isinstance(c.tx.next_event(), NeedData)


@pytest.mark.parametrize("kw", [{}, {"structured": True}, {"extended": True}])
def test_flush_and_flush_with_fua_succeed(kw: dict[str, bool]) -> None:
    c = conn(None, **kw)
    assert c.error_of(Command.FLUSH) == 0
    assert c.error_of(Command.FLUSH, flags=FUA) == 0


def test_bad_request_magic_is_a_hard_close() -> None:
    c = conn()
    assert c.feed(c.request(Command.READ, 0, 16, magic=0xDEADBEEF)) == b""
    assert c.closed is not None and not c.closed.clean


class _FragmentedBackend(MemoryBackend):
    """Reports many small extents, several in a row with the same status."""

    def read_extents(self, length: int, offset: int) -> list[Extent]:
        zero = StateFlag.HOLE | StateFlag.ZERO
        pattern = [StateFlag(0), StateFlag(0), zero, zero, zero, StateFlag(0)]
        return [Extent(512, pattern[i % 6]) for i in range(-(-length // 512))]


def test_structured_read_merges_runs_and_still_covers_the_request() -> None:
    c = Conn(negotiate(ExportInfo("", SIZE), structured=True), _FragmentedBackend(SIZE))
    replies = c.call(Command.READ, 0, 6 * 512)
    kinds = [r.type for r in replies if r.type != ChunkType.NONE]
    assert kinds == [ChunkType.OFFSET_DATA, ChunkType.OFFSET_HOLE, ChunkType.OFFSET_DATA]
    assert c.read(0, 6 * 512) == bytes(6 * 512)
