"""What the raw-wire client hands back: option results and transmission replies.

These are plain aggregates over the messages of :mod:`.messages`; they parse
lazily so that a check can look at a malformed reply itself rather than have
the client raise before the check sees anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import Errno, Info, Rep
from .messages import (
    BlockSize,
    BlockStatus,
    Chunk,
    ChunkError,
    ExportInfo,
    InfoReply,
    OffsetData,
    OffsetHole,
    OptionReply,
    ProtocolViolation,
    SimpleReply,
    parse_chunk,
    unpack_info,
    unpack_rep_meta_context,
    unpack_rep_server,
)


@dataclass
class OptionResult:
    """All replies to one option: zero or more intermediate replies, then a final one."""

    replies: list[OptionReply]

    @property
    def final(self) -> OptionReply:
        return self.replies[-1]

    @property
    def type(self) -> Rep:
        return self.final.type

    @property
    def ok(self) -> bool:
        return self.final.type == Rep.ACK

    @property
    def intermediate(self) -> list[OptionReply]:
        return self.replies[:-1]

    @property
    def infos(self) -> list[InfoReply]:
        return [unpack_info(r.data) for r in self.intermediate if r.type == Rep.INFO]

    def info(self, kind: Info) -> InfoReply | None:
        found = [i for i in self.infos if i.type == kind]
        return found[0] if found else None

    @property
    def export(self) -> ExportInfo | None:
        found = self.info(Info.EXPORT)
        return found.value if found and isinstance(found.value, ExportInfo) else None

    @property
    def block_size(self) -> BlockSize | None:
        found = self.info(Info.BLOCK_SIZE)
        return found.value if found and isinstance(found.value, BlockSize) else None

    @property
    def exports(self) -> list[tuple[bytes, bytes]]:
        """NBD_OPT_LIST: (name, details) of every NBD_REP_SERVER."""
        return [unpack_rep_server(r.data) for r in self.intermediate if r.type == Rep.SERVER]

    @property
    def contexts(self) -> dict[str, int]:
        """LIST/SET_META_CONTEXT: context name -> id."""
        out: dict[str, int] = {}
        for r in self.intermediate:
            if r.type == Rep.META_CONTEXT:
                context_id, name = unpack_rep_meta_context(r.data)
                out[name] = context_id
        return out

    @property
    def context_replies(self) -> list[bytes]:
        """LIST/SET_META_CONTEXT: the payload of every NBD_REP_META_CONTEXT (ID, then name)."""
        return [r.data for r in self.intermediate if r.type == Rep.META_CONTEXT]

    def describe(self) -> str:
        return ", ".join(f"{r.type.name}({len(r.data)} bytes)" for r in self.replies)


@dataclass
class ExportNameResult:
    """The reply to NBD_OPT_EXPORT_NAME: export info and the trailing zeroes read."""

    export: ExportInfo
    zeroes: bytes


@dataclass
class DisconnectResult:
    """What :meth:`WireClient.expect_disconnect` saw before the deadline."""

    disconnected: bool
    data: bytes
    waited: float


@dataclass
class Reply:
    """Every message the server sent for one request cookie, in arrival order."""

    cookie: int
    messages: list[SimpleReply | Chunk] = field(default_factory=list)

    @property
    def is_simple(self) -> bool:
        return len(self.messages) == 1 and isinstance(self.messages[0], SimpleReply)

    @property
    def chunks(self) -> list[Chunk]:
        return [m for m in self.messages if isinstance(m, Chunk)]

    def parsed(self) -> list[OffsetData | OffsetHole | BlockStatus | ChunkError | None]:
        return [parse_chunk(c) for c in self.chunks]

    @property
    def error(self) -> Errno:
        """The request's error: a simple reply's, or the first error chunk's, else OK."""
        for m in self.messages:
            if isinstance(m, SimpleReply):
                if m.error:
                    return m.error
            elif m.type.is_error:
                parsed = parse_chunk(m)
                assert isinstance(parsed, ChunkError)
                return parsed.error
        return Errno.OK

    @property
    def block_status(self) -> list[BlockStatus]:
        return [p for p in self.parsed() if isinstance(p, BlockStatus)]

    def data(self, offset: int, length: int) -> bytes:
        """The bytes a successful READ returned, reassembled from content chunks.

        Raises :class:`ProtocolViolation` where chunks overlap, leave the
        request's range, or leave part of it uncovered.
        """
        if self.is_simple:
            simple = self.messages[0]
            assert isinstance(simple, SimpleReply)
            return simple.data
        buf = bytearray(length)
        covered: list[tuple[int, int]] = []
        for item in self.parsed():
            if isinstance(item, OffsetData):
                start, end = item.offset, item.offset + len(item.data)
            elif isinstance(item, OffsetHole):
                start, end = item.offset, item.offset + item.size
            else:
                continue
            if start < offset or end > offset + length:
                raise ProtocolViolation(
                    f"content chunk [{start}, {end}) outside the request [{offset}, "
                    f"{offset + length})"
                )
            for a, b in covered:
                if start < b and a < end:
                    raise ProtocolViolation(f"content chunk [{start}, {end}) overlaps [{a}, {b})")
            covered.append((start, end))
            if isinstance(item, OffsetData):
                buf[start - offset : end - offset] = item.data
        total = sum(b - a for a, b in covered)
        if total != length:
            raise ProtocolViolation(f"content chunks cover {total} of {length} bytes")
        return bytes(buf)
