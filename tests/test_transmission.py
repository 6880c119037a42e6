"""Unit tests of the sans-IO transmission phase (protocol/transmission.py).

Each test negotiates through the real Handshake (bytes in), then feeds request
bytes built here with ``struct`` from proto.md ("Request message") and the
EXTENDED_HEADERS extension, runs the resulting Request events against a
MemoryBackend through the dispatch layer (reference_server/dispatch.py), and
parses the reply bytes with an independent parser.  No sockets and no
reference_server.protocol.wire.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field

import pytest

from reference_server.backends.base import Extent
from reference_server.backends.memory import PAGE_SIZE, MemoryBackend
from reference_server.dispatch import execute
from reference_server.protocol.constants import (
    ChunkType,
    Command,
    CommandFlag,
    Errno,
    Info,
    Option,
    ReplyFlag,
    StateFlag,
)
from reference_server.protocol.events import Close, EnterTransmission, NeedData
from reference_server.protocol.events import Request as RequestEvent
from reference_server.protocol.export import BlockSizes, ExportInfo
from reference_server.protocol.handshake import Handshake
from reference_server.protocol.transmission import Transmission

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
EXTENDED_MAGIC = 0x6E8A278C
SIZE = 1 << 20

FUA = CommandFlag.FUA
NO_HOLE = CommandFlag.NO_HOLE
DF = CommandFlag.DF
REQ_ONE = CommandFlag.REQ_ONE
FAST_ZERO = CommandFlag.FAST_ZERO
PAYLOAD_LEN = CommandFlag.PAYLOAD_LEN


def _option(number: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, number, len(data)) + data


def negotiate(
    export: ExportInfo,
    *,
    structured: bool = False,
    extended: bool = False,
    meta: bool = False,
) -> Transmission:
    """Run the handshake over bytes and return the transmission state machine."""
    hs = Handshake({export.name: export})
    hs.receive_data(struct.pack(">I", 3))
    data = b""
    if structured:
        data += _option(Option.STRUCTURED_REPLY)
    if extended:
        data += _option(Option.EXTENDED_HEADERS)
    if meta:
        q = b"base:allocation"
        data += _option(
            Option.SET_META_CONTEXT, struct.pack(">II", 0, 1) + struct.pack(">I", len(q)) + q
        )
    data += _option(Option.GO, struct.pack(">IHH", 0, 1, Info.BLOCK_SIZE))
    hs.receive_data(data)
    event = hs.next_event()
    assert isinstance(event, EnterTransmission), event
    return Transmission(event.negotiated)


# --------------------------------------------------------------- replies


@dataclass
class Reply:
    """One reply message: a simple reply or one structured/extended chunk."""

    cookie: int
    simple: bool
    error: int = 0
    flags: int = 0
    type: int = 0
    offset: int | None = None  # extended replies echo the request offset
    payload: bytes = b""

    @property
    def done(self) -> bool:
        return self.simple or bool(self.flags & ReplyFlag.DONE)

    def error_chunk(self) -> tuple[int, str]:
        assert self.type == ChunkType.ERROR, f"expected an error chunk, got type {self.type}"
        err, mlen = struct.unpack_from(">IH", self.payload)
        assert len(self.payload) == 6 + mlen, "error message length disagrees with chunk length"
        return err, self.payload[6:].decode("utf-8")


@dataclass(repr=False)
class Conn:
    tx: Transmission
    backend: MemoryBackend
    closed: Close | None = None
    read_lengths: dict[int, int] = field(default_factory=dict)
    _cookie: int = 0x1000
    _buffer: bytes = b""

    @property
    def extended(self) -> bool:
        return self.tx.negotiated.extended_headers

    def request(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        data: bytes = b"",
        cookie: int | None = None,
        magic: int | None = None,
    ) -> bytes:
        """C: a compact (28-byte) or, once negotiated, extended (32-byte) request."""
        if cookie is None:
            self._cookie += 1
            cookie = self._cookie
        if command == Command.READ and not flags & PAYLOAD_LEN:
            self.read_lengths[cookie] = length
        if self.extended:
            m = EXTENDED_REQUEST_MAGIC if magic is None else magic
            return struct.pack(">IHHQQQ", m, flags, command, cookie, offset, length) + data
        m = REQUEST_MAGIC if magic is None else magic
        return struct.pack(">IHHQQI", m, flags, command, cookie, offset, length) + data

    def feed(self, data: bytes) -> bytes:
        """Feed bytes; run every command the parser yields; return all reply bytes."""
        out = b""
        self.tx.receive_data(data)
        while True:
            event = self.tx.next_event()
            out += b"".join(bytes(b) for b in self.tx.data_to_send())
            if isinstance(event, NeedData):
                return out
            if isinstance(event, Close):
                self.closed = event
                return out
            assert isinstance(event, RequestEvent)
            out += b"".join(bytes(b) for b in execute(self.tx.replies, event, self.backend))

    def parse(self, data: bytes) -> list[Reply]:
        """Split reply bytes into messages, checking magics and lengths."""
        data = self._buffer + data
        replies, pos = [], 0
        while pos < len(data):
            (magic,) = struct.unpack_from(">I", data, pos)
            if magic == SIMPLE_MAGIC:
                assert not self.extended, "simple reply after extended headers"
                _, error, cookie = struct.unpack_from(">IIQ", data, pos)
                pos += 16
                n = self.read_lengths.get(cookie, 0) if error == 0 else 0
                replies.append(Reply(cookie, True, error=error, payload=data[pos : pos + n]))
                pos += n
            elif magic == STRUCTURED_MAGIC:
                assert not self.extended, "structured reply after extended headers"
                _, flags, rtype, cookie, length = struct.unpack_from(">IHHQI", data, pos)
                pos += 20
                replies.append(
                    Reply(cookie, False, 0, flags, rtype, None, data[pos : pos + length])
                )
                pos += length
            elif magic == EXTENDED_MAGIC:
                assert self.extended, "extended reply without extended headers"
                _, flags, rtype, cookie, off, length = struct.unpack_from(">IHHQQQ", data, pos)
                pos += 32
                replies.append(Reply(cookie, False, 0, flags, rtype, off, data[pos : pos + length]))
                pos += length
            else:
                raise AssertionError(f"unknown reply magic {magic:#x} at byte {pos}")
            assert pos <= len(data), "reply truncated"
        return replies

    def call(self, command: int, offset: int = 0, length: int = 0, **kw: object) -> list[Reply]:
        """One request and its whole reply (all chunks up to DONE)."""
        raw = self.request(command, offset, length, **kw)  # type: ignore[arg-type]
        (cookie,) = struct.unpack_from(">Q", raw, 8)
        replies = self.parse(self.feed(raw))
        assert replies, f"no reply to {Command(command).name}"
        assert all(r.cookie == cookie for r in replies), "cookie not echoed"
        assert replies[-1].done and not any(r.done for r in replies[:-1])
        if self.extended:
            assert all(r.offset == offset for r in replies), "extended reply offset not echoed"
        return replies

    def error_of(self, command: int, offset: int = 0, length: int = 0, **kw: object) -> int:
        """The NBD error of a request (0 on success), from either reply style."""
        replies = self.call(command, offset, length, **kw)
        errors = [r.error for r in replies if r.simple and r.error]
        errors += [r.error_chunk()[0] for r in replies if not r.simple and r.type & 0x8000]
        assert len(errors) <= 1
        return errors[0] if errors else 0

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        """Reassemble a successful read from whichever reply style was used."""
        replies = self.call(Command.READ, offset, length, flags=flags)
        if replies[0].simple:
            assert replies[0].error == 0
            return replies[0].payload
        buf = bytearray(length)
        covered = [False] * length
        for r in replies:
            if r.type == ChunkType.OFFSET_DATA:
                (start,) = struct.unpack_from(">Q", r.payload)
                body = r.payload[8:]
                n = len(body)
            elif r.type == ChunkType.OFFSET_HOLE:
                start, n = struct.unpack(">QI", r.payload)
                body = bytes(n)
            else:
                assert r.type == ChunkType.NONE, f"unexpected chunk type {r.type}"
                continue
            assert n > 0, "content chunk describing no bytes"
            assert offset <= start and start + n <= offset + length, "chunk outside request"
            rel = start - offset
            assert not any(covered[rel : rel + n]), "overlapping content chunks"
            covered[rel : rel + n] = [True] * n
            buf[rel : rel + n] = body
        assert all(covered), "read reply does not cover the whole request"
        return bytes(buf)

    def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        if self.extended:
            flags |= PAYLOAD_LEN
        return self.error_of(Command.WRITE, offset, len(data), flags=flags, data=data)


def conn(
    export: ExportInfo | None = None,
    *,
    structured: bool = False,
    extended: bool = False,
    meta: bool = False,
) -> Conn:
    export = export or ExportInfo("", SIZE)
    tx = negotiate(export, structured=structured, extended=extended, meta=meta)
    return Conn(tx, MemoryBackend(export.size))


PATTERN = bytes(range(256)) * 16  # 4 KiB


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
    [reply] = c.parse(out)
    assert reply.error == Errno.EPERM  # answered at once; the payload is then dropped
    replies = c.parse(c.feed(data[:3000]) + c.feed(data[3000:] + c.request(Command.READ, 0, 8)))
    assert [(r.error, r.payload) for r in replies] == [(0, bytes(8))]


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


# -------------------------------------------------------------------- TRIM


def test_trim_succeeds_and_is_fua_capable() -> None:
    c = conn()
    c.write(0, PATTERN)
    assert c.error_of(Command.TRIM, 0, 4096) == 0
    assert c.error_of(Command.TRIM, 0, 4096, flags=FUA) == 0


def test_trim_past_the_end_is_einval() -> None:
    c = conn()
    assert c.error_of(Command.TRIM, SIZE - 4096, 8192) == Errno.EINVAL


def test_trim_on_read_only_is_eperm() -> None:
    c = conn(ExportInfo("", SIZE, read_only=True))
    assert c.error_of(Command.TRIM, 0, 4096) == Errno.EPERM


def test_trim_not_advertised_is_einval() -> None:
    c = conn(ExportInfo("", SIZE, can_trim=False))
    assert c.error_of(Command.TRIM, 0, 4096) == Errno.EINVAL


# ------------------------------------------------------------------- CACHE


def test_cache_succeeds_and_out_of_range_fails() -> None:
    c = conn()
    assert c.error_of(Command.CACHE, 0, 65536) == 0
    assert c.error_of(Command.CACHE, 0, 65536, flags=FUA) == 0
    assert c.error_of(Command.CACHE, SIZE, 1) == Errno.EINVAL


def test_cache_with_inapplicable_flag_is_einval() -> None:
    # "if it advertised the command, the server MUST reject any command flags
    # it does not recognize".
    c = conn(structured=True)
    assert c.error_of(Command.CACHE, 0, 512, flags=DF) == Errno.EINVAL


# ----------------------------------------------------------- WRITE_ZEROES


@pytest.mark.parametrize("flags", [0, NO_HOLE, FAST_ZERO, NO_HOLE | FAST_ZERO | FUA])
def test_write_zeroes_reads_back_zero(flags: int) -> None:
    c = conn()
    c.write(0, PATTERN * 20)
    assert c.error_of(Command.WRITE_ZEROES, 100, 50000, flags=flags) == 0
    expected = (PATTERN * 20)[:100] + bytes(50000) + (PATTERN * 20)[50100:]
    assert c.read(0, len(PATTERN) * 20) == expected


def test_write_zeroes_past_the_end_is_enospc() -> None:
    c = conn()
    assert c.error_of(Command.WRITE_ZEROES, SIZE - 1, 2) == Errno.ENOSPC


def test_write_zeroes_on_read_only_is_eperm() -> None:
    c = conn(ExportInfo("", SIZE, read_only=True))
    assert c.error_of(Command.WRITE_ZEROES, 0, 4096) == Errno.EPERM
    assert c.error_of(Command.WRITE_ZEROES, 0, 4096, flags=NO_HOLE) == Errno.EPERM


def test_fast_zero_without_advertising_it_is_einval() -> None:
    # "If the server did not advertise NBD_FLAG_SEND_FAST_ZERO ... SHOULD fail
    # with NBD_EINVAL if the NBD_CMD_FLAG_FAST_ZERO flag was set."
    c = conn(ExportInfo("", SIZE, can_fast_zero=False))
    assert c.error_of(Command.WRITE_ZEROES, 0, 4096, flags=FAST_ZERO) == Errno.EINVAL
    assert c.error_of(Command.WRITE_ZEROES, 0, 4096) == 0


def test_write_zeroes_not_advertised_is_einval() -> None:
    c = conn(ExportInfo("", SIZE, can_zero=False))
    assert c.error_of(Command.WRITE_ZEROES, 0, 4096) == Errno.EINVAL


class _SlowZeroBackend(MemoryBackend):
    """A backend whose zeroing is never fast, to check the ENOTSUP mapping."""

    def zero(self, length: int, offset: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        if fast:
            raise OSError(errno.ENOTSUP, "not fast")
        super().zero(length, offset, may_trim=may_trim, fast=fast, fua=fua)


def test_fast_zero_that_would_be_slow_is_enotsup_and_changes_nothing() -> None:
    export = ExportInfo("", SIZE)
    c = Conn(negotiate(export, structured=True), _SlowZeroBackend(SIZE))
    c.write(0, PATTERN)
    assert c.error_of(Command.WRITE_ZEROES, 0, 4096, flags=FAST_ZERO) == Errno.ENOTSUP
    assert c.read(0, len(PATTERN)) == PATTERN
    assert c.error_of(Command.WRITE_ZEROES, 0, 4096) == 0


# ------------------------------------------------------------ BLOCK_STATUS


def descriptors(reply: Reply, extended: bool) -> tuple[int, list[tuple[int, int]]]:
    if extended:
        assert reply.type == ChunkType.BLOCK_STATUS_EXT
        cid, count = struct.unpack_from(">II", reply.payload)
        assert len(reply.payload) == 8 + 16 * count and count > 0
        pairs = list(struct.iter_unpack(">QQ", reply.payload[8:]))
    else:
        assert reply.type == ChunkType.BLOCK_STATUS
        (cid,) = struct.unpack_from(">I", reply.payload)
        assert (len(reply.payload) - 4) % 8 == 0 and len(reply.payload) > 4
        pairs = list(struct.iter_unpack(">II", reply.payload[4:]))
    assert all(length > 0 for length, _ in pairs), "descriptor of zero length"
    return cid, pairs


@pytest.mark.parametrize("extended", [False, True])
def test_block_status_reports_holes_and_data(extended: bool) -> None:
    c = conn(structured=True, extended=extended, meta=True)
    c.write(PAGE_SIZE, PATTERN)
    [reply] = c.call(Command.BLOCK_STATUS, 0, 4 * PAGE_SIZE)
    cid, pairs = descriptors(reply, extended)
    assert cid in c.tx.negotiated.meta_contexts
    hole = StateFlag.HOLE | StateFlag.ZERO
    assert pairs == [(PAGE_SIZE, hole), (PAGE_SIZE, 0), (2 * PAGE_SIZE, hole)]


@pytest.mark.parametrize("extended", [False, True])
def test_block_status_req_one_returns_one_extent_within_length(extended: bool) -> None:
    c = conn(structured=True, extended=extended, meta=True)
    [reply] = c.call(Command.BLOCK_STATUS, 0, 1000, flags=REQ_ONE)
    _, pairs = descriptors(reply, extended)
    assert len(pairs) == 1 and pairs[0][0] <= 1000
    c.write(0, PATTERN)
    [reply] = c.call(Command.BLOCK_STATUS, 0, 3 * PAGE_SIZE, flags=REQ_ONE)
    assert descriptors(reply, extended)[1] == [(PAGE_SIZE, 0)]


def test_block_status_without_meta_context_is_einval() -> None:
    c = conn(structured=True)
    assert c.error_of(Command.BLOCK_STATUS, 0, 4096) == Errno.EINVAL


def test_block_status_past_the_end_is_einval() -> None:
    c = conn(structured=True, meta=True)
    assert c.error_of(Command.BLOCK_STATUS, SIZE - 512, 1024) == Errno.EINVAL


def test_block_status_extents_do_not_overshoot_before_the_last() -> None:
    # "the sum of the length fields of the first N-1 extents (if any) MUST be
    # less than the requested length".
    c = conn(structured=True, meta=True)
    for i in range(0, 8, 2):
        c.write(i * PAGE_SIZE, b"x")
    [reply] = c.call(Command.BLOCK_STATUS, 100, 5 * PAGE_SIZE)
    _, pairs = descriptors(reply, False)
    assert sum(length for length, _ in pairs[:-1]) < 5 * PAGE_SIZE


class _ManyExtentsBackend(MemoryBackend):
    def extents(self, length: int, offset: int) -> list[Extent]:
        flags = [StateFlag(0), StateFlag.HOLE | StateFlag.ZERO]
        return [Extent(1, flags[i % 2]) for i in range(min(length, 5))]


def test_block_status_req_one_with_many_extents_sends_the_first() -> None:
    c = Conn(negotiate(ExportInfo("", SIZE), structured=True, meta=True), _ManyExtentsBackend(SIZE))
    [reply] = c.call(Command.BLOCK_STATUS, 0, 100, flags=REQ_ONE)
    assert descriptors(reply, False)[1] == [(1, 0)]
    [reply] = c.call(Command.BLOCK_STATUS, 0, 100)
    assert len(descriptors(reply, False)[1]) == 5


def test_block_status_on_a_sparse_tebibyte_uses_64_bit_lengths_when_extended() -> None:
    tib = 1 << 40
    export = ExportInfo("", tib)
    c = Conn(negotiate(export, extended=True, meta=True), MemoryBackend(tib))
    [reply] = c.call(Command.BLOCK_STATUS, 0, tib)
    assert descriptors(reply, True)[1] == [(tib, StateFlag.HOLE | StateFlag.ZERO)]
    # Compact descriptors: 32-bit lengths, never beyond the request.
    c = Conn(negotiate(export, structured=True, meta=True), MemoryBackend(tib))
    [reply] = c.call(Command.BLOCK_STATUS, 0, 0xFFFFFFFF)
    _, pairs = descriptors(reply, False)
    assert pairs[0][0] <= 0xFFFFFFFF and pairs[0][1] == StateFlag.HOLE | StateFlag.ZERO


def test_block_status_of_zero_length_is_an_error_not_a_disconnect() -> None:
    # "The client SHOULD NOT request a status length of 0; ... the server
    # SHOULD NOT disconnect."
    c = conn(structured=True, meta=True)
    assert c.error_of(Command.BLOCK_STATUS, 0, 0) == Errno.EINVAL
    assert c.closed is None


class _NoExtentsBackend(MemoryBackend):
    def extents(self, length: int, offset: int) -> list[Extent]:
        return []


def test_block_status_when_the_backend_reports_nothing_is_an_error() -> None:
    c = Conn(negotiate(ExportInfo("", SIZE), structured=True, meta=True), _NoExtentsBackend(SIZE))
    assert c.error_of(Command.BLOCK_STATUS, 0, 4096) != 0


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


def test_cache_not_advertised_is_einval() -> None:
    c = conn(ExportInfo("", SIZE, can_cache=False))
    assert c.error_of(Command.CACHE, 0, 4096) == Errno.EINVAL


# ------------------------------------------------------- extended headers


def test_extended_write_and_read_with_64_bit_lengths() -> None:
    c = conn(extended=True)
    assert c.write(4096, PATTERN) == 0
    assert c.read(4096, len(PATTERN)) == PATTERN
    # Success without payload is an NBD_REPLY_TYPE_NONE chunk, never a simple reply.
    [reply] = c.call(Command.FLUSH)
    assert reply.type == ChunkType.NONE and reply.payload == b""


def test_extended_write_without_payload_len_is_einval() -> None:
    # "The command NBD_CMD_WRITE MUST use the flag NBD_CMD_FLAG_PAYLOAD_LEN".
    c = conn(extended=True)
    assert c.error_of(Command.WRITE, 0, 4) == Errno.EINVAL
    assert c.closed is None


def test_extended_payload_on_a_command_without_one_is_consumed_then_einval() -> None:
    # "a server SHOULD gracefully consume length bytes of payload (even if it
    # then replies with an NBD_EINVAL failure ...)".
    c = conn(extended=True)
    c.write(0, b"abcd")
    assert c.error_of(Command.READ, 0, 8, flags=PAYLOAD_LEN, data=bytes(8)) == Errno.EINVAL
    assert c.read(0, 4) == b"abcd"


def test_extended_payload_above_32m_disconnects() -> None:
    c = conn(extended=True)
    assert c.feed(c.request(Command.WRITE, 0, (1 << 25) + 1, flags=PAYLOAD_LEN)) == b""
    assert c.closed is not None and not c.closed.clean


def test_extended_effect_length_beyond_32_bits_is_checked_against_the_size() -> None:
    c = conn(extended=True)
    assert c.error_of(Command.WRITE_ZEROES, 0, 1 << 40) == Errno.ENOSPC
    assert c.error_of(Command.TRIM, 0, 1 << 40) == Errno.EINVAL


def test_compact_request_after_extended_headers_is_a_hard_close() -> None:
    c = conn(extended=True)
    compact = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Command.READ, 1, 0, 16)
    c.feed(compact + bytes(4))
    assert c.closed is not None and not c.closed.clean


def test_extended_request_magic_without_extended_headers_is_a_hard_close() -> None:
    c = conn(structured=True)
    c.feed(struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, 0, Command.READ, 1, 0, 16))
    assert c.closed is not None and not c.closed.clean


# ---------------------------------------------------------- error values


@pytest.mark.parametrize("command", [Command.RESIZE, 9, 0x1234, 0xFFFF])
@pytest.mark.parametrize("kw", [{}, {"structured": True}, {"extended": True}])
def test_unknown_command_is_einval(command: int, kw: dict[str, bool]) -> None:
    c = conn(None, **kw)
    assert c.error_of(command, 0, 512) == Errno.EINVAL
    assert c.closed is None


@pytest.mark.parametrize("bit", [6, 12, 15])
@pytest.mark.parametrize(
    "command",
    [Command.READ, Command.FLUSH, Command.WRITE_ZEROES],
    ids=["READ", "FLUSH", "WRITE_ZEROES"],
)
def test_unknown_command_flag_is_einval(bit: int, command: Command) -> None:
    # "Error values": "SHOULD return NBD_EINVAL if it receives an unknown command flag".
    c = conn(structured=True)
    assert c.error_of(command, 0, 512, flags=1 << bit) == Errno.EINVAL


def test_unknown_command_flag_on_write_is_einval() -> None:
    c = conn()
    assert c.write(0, b"abcd", 1 << 7) == Errno.EINVAL
    assert c.read(0, 4) == bytes(4)


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (Command.READ, NO_HOLE),
        (Command.READ, REQ_ONE),
        (Command.READ, FAST_ZERO),
        (Command.READ, PAYLOAD_LEN),
        (Command.WRITE_ZEROES, DF),
        (Command.WRITE_ZEROES, REQ_ONE),
        (Command.TRIM, NO_HOLE),
        (Command.TRIM, FAST_ZERO),
        (Command.FLUSH, DF),
        (Command.BLOCK_STATUS, DF),
        (Command.BLOCK_STATUS, NO_HOLE),
    ],
)
def test_inapplicable_flag_is_einval(command: Command, flag: CommandFlag) -> None:
    # "It also SHOULD return NBD_EINVAL if it receives a request with a flag not
    # explicitly documented as applicable to the given request."
    c = conn(structured=True, meta=True)
    assert c.error_of(command, 0, 512, flags=flag) == Errno.EINVAL


@pytest.mark.parametrize("flag", [NO_HOLE, DF, REQ_ONE, FAST_ZERO])
def test_inapplicable_flag_on_write_is_einval(flag: CommandFlag) -> None:
    c = conn(structured=True)
    assert c.write(0, b"abcd", flag) == Errno.EINVAL
    assert c.read(0, 4) == bytes(4)


def test_df_without_structured_replies_is_einval() -> None:
    # SEND_DF is clear without structured replies: DF MUST NOT be used then.
    c = conn()
    assert c.error_of(Command.READ, 0, 512, flags=DF) == Errno.EINVAL


ALIGNED = ExportInfo("", SIZE, block_sizes=BlockSizes(512, 4096, 1 << 20))


@pytest.mark.parametrize(
    ("command", "offset", "length"),
    [
        (Command.READ, 1, 512),
        (Command.READ, 0, 100),
        (Command.TRIM, 256, 512),
        (Command.WRITE_ZEROES, 512, 1000),
        (Command.CACHE, 100, 512),
    ],
)
def test_misaligned_request_is_einval(command: Command, offset: int, length: int) -> None:
    c = conn(ALIGNED, structured=True)
    assert c.error_of(command, offset, length) == Errno.EINVAL


def test_misaligned_write_is_einval_and_aligned_one_works() -> None:
    c = conn(ALIGNED)
    assert c.write(100, bytes(512)) == Errno.EINVAL
    assert c.write(512, b"y" * 100) == Errno.EINVAL
    assert c.write(512, b"y" * 512) == 0
    assert c.read(512, 512) == b"y" * 512


# ----------------------------------------------------- backend error mapping


class _FailingBackend(MemoryBackend):
    def __init__(self, size: int, err: int) -> None:
        super().__init__(size)
        self.err = err

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
        raise OSError(self.err, "injected")

    def pread(self, length: int, offset: int) -> bytes:
        raise OSError(self.err, "injected")

    def pread_into(self, view: memoryview, offset: int, *, fresh: bool = False) -> None:
        raise OSError(self.err, "injected")


@pytest.mark.parametrize(
    ("err", "nbd"),
    [
        (errno.EDQUOT, Errno.ENOSPC),
        (errno.EFBIG, Errno.ENOSPC),
        (errno.ENOSPC, Errno.ENOSPC),
        (errno.EROFS, Errno.EPERM),
        (errno.EIO, Errno.EIO),
        (errno.ENOENT, Errno.EIO),
    ],
)
def test_backend_errno_is_mapped_to_an_nbd_error(err: int, nbd: Errno) -> None:
    c = Conn(negotiate(ExportInfo("", SIZE)), _FailingBackend(SIZE, err))
    assert c.write(0, b"abcd") == nbd


def test_backend_read_error_with_structured_replies_is_an_error_chunk() -> None:
    c = Conn(negotiate(ExportInfo("", SIZE), structured=True), _FailingBackend(SIZE, errno.EIO))
    c.backend.extents = lambda length, offset: [Extent(length, StateFlag(0))]  # type: ignore[method-assign]
    [reply] = c.call(Command.READ, 0, 512)
    assert reply.error_chunk()[0] == Errno.EIO
