"""A transmission phase driven with bytes: the harness of the tests/test_transmission_*.py files.

:func:`conn` negotiates through the real Handshake (bytes in), and
:class:`Conn` feeds request bytes built here with ``struct`` from proto.md
("Request message") and the EXTENDED_HEADERS extension, runs the resulting
Request events against a MemoryBackend through the dispatch layer
(reference_server/dispatch.py), and parses the reply bytes with an independent
parser (:class:`Reply`).  No sockets and no reference_server.protocol.wire.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from reference_server.backends.memory import MemoryBackend
from reference_server.dispatch import execute
from reference_server.protocol.constants import (
    ChunkType,
    Command,
    CommandFlag,
    Info,
    Option,
    ReplyFlag,
)
from reference_server.protocol.events import Close, EnterTransmission, NeedData
from reference_server.protocol.events import Request as RequestEvent
from reference_server.protocol.export import ExportInfo
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
    contexts: tuple[bytes, ...] = (),
) -> Transmission:
    """Run the handshake over bytes and return the transmission state machine.

    ``meta`` selects base:allocation; ``contexts`` are further queries to select.
    """
    hs = Handshake({export.name: export})
    hs.receive_data(struct.pack(">I", 3))
    data = b""
    if structured:
        data += _option(Option.STRUCTURED_REPLY)
    if extended:
        data += _option(Option.EXTENDED_HEADERS)
    queries = ((b"base:allocation",) if meta else ()) + contexts
    if queries:
        body = b"".join(struct.pack(">I", len(q)) + q for q in queries)
        data += _option(Option.SET_META_CONTEXT, struct.pack(">II", 0, len(queries)) + body)
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
    in_store: bool = False,
) -> Conn:
    """A negotiated connection to a fresh MemoryBackend; with ``in_store``, write
    payloads are received straight into it (``Backend.write_view``), as the server does."""
    export = export or ExportInfo("", SIZE)
    tx = negotiate(export, structured=structured, extended=extended, meta=meta)
    backend = MemoryBackend(export.size)
    if in_store:
        tx.write_target = backend.write_view
    return Conn(tx, backend)


PATTERN = bytes(range(256)) * 16  # 4 KiB
