"""Struct layouts of every NBD message: pack and unpack, nothing else.

Written from /work/shared/spec/proto.md (and proto-extension-ext-header.md for
the 32-byte extended headers).  Packers accept values the spec forbids (any
option number, a length field that lies about its payload, unknown flags):
the conformance suite must be able to send what a broken client would.
Unpackers are strict about sizes and raise :class:`ProtocolViolation` when the
server sends something the layout cannot hold.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    REQUEST_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Errno,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)


class ProtocolViolation(Exception):
    """The server sent bytes that do not fit the layout the spec defines."""


# ---------------------------------------------------------------- handshake

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags


@dataclass(frozen=True)
class Greeting:
    """Handshake / Newstyle negotiation: the server's first 18 bytes."""

    magic: int
    option_magic: int
    flags: HandshakeFlag


def unpack_greeting(data: bytes) -> Greeting:
    magic, option_magic, flags = GREETING.unpack(data)
    return Greeting(magic, option_magic, HandshakeFlag(flags))


def pack_client_flags(flags: int) -> bytes:
    return CLIENT_FLAGS.pack(flags)


def pack_option(
    option: int, data: bytes = b"", *, length: int | None = None, magic: int = IHAVEOPT
) -> bytes:
    """An option request; *length* overrides the true payload length (to lie)."""
    claimed = len(data) if length is None else length
    return OPTION_HEADER.pack(magic, option, claimed) + data


@dataclass(frozen=True)
class OptionReply:
    """Handshake / Fixed newstyle negotiation: one option reply."""

    magic: int
    option: Opt
    type: Rep
    data: bytes

    @property
    def is_error(self) -> bool:
        return self.type.is_error

    @property
    def is_final(self) -> bool:
        """ACK and errors end an option's replies; SERVER/INFO/META_CONTEXT do not."""
        return self.type not in (Rep.SERVER, Rep.INFO, Rep.META_CONTEXT)


def unpack_option_reply_header(data: bytes) -> tuple[int, Opt, Rep, int]:
    magic, option, rep, length = OPTION_REPLY_HEADER.unpack(data)
    return magic, Opt(option), Rep(rep), length


def pack_name_and_infos(
    name: bytes, infos: list[int] | tuple[int, ...] = (), *, name_length: int | None = None
) -> bytes:
    """Payload of NBD_OPT_INFO / NBD_OPT_GO; *name_length* may lie."""
    claimed = len(name) if name_length is None else name_length
    infos = list(infos)
    return (
        struct.pack(">I", claimed)
        + name
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def pack_meta_context_query(name: bytes, queries: list[bytes] | tuple[bytes, ...]) -> bytes:
    """Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for query in queries:
        out += struct.pack(">I", len(query)) + query
    return out


@dataclass(frozen=True)
class ExportInfo:
    """NBD_INFO_EXPORT, or the reply to NBD_OPT_EXPORT_NAME."""

    size: int
    flags: TransmissionFlag


def unpack_export_name_reply(data: bytes) -> ExportInfo:
    size, flags = EXPORT_NAME_REPLY.unpack(data)
    return ExportInfo(size, TransmissionFlag(flags))


@dataclass(frozen=True)
class BlockSize:
    """NBD_INFO_BLOCK_SIZE (Size constraints)."""

    minimum: int
    preferred: int
    maximum: int


@dataclass(frozen=True)
class InfoReply:
    """One parsed NBD_REP_INFO payload; ``value`` depends on ``type``."""

    type: Info
    value: ExportInfo | BlockSize | str | bytes


def unpack_info(data: bytes) -> InfoReply:
    """Values / Option reply types / NBD_REP_INFO: check each type's length."""
    if len(data) < 2:
        raise ProtocolViolation(f"NBD_REP_INFO payload of {len(data)} bytes, need at least 2")
    info = Info(struct.unpack_from(">H", data)[0])
    body = data[2:]
    if info == Info.EXPORT:
        if len(data) != 12:
            raise ProtocolViolation(f"NBD_INFO_EXPORT length {len(data)}, expected 12")
        size, flags = struct.unpack(">QH", body)
        return InfoReply(info, ExportInfo(size, TransmissionFlag(flags)))
    if info == Info.BLOCK_SIZE:
        if len(data) != 14:
            raise ProtocolViolation(f"NBD_INFO_BLOCK_SIZE length {len(data)}, expected 14")
        return InfoReply(info, BlockSize(*struct.unpack(">III", body)))
    if info in (Info.NAME, Info.DESCRIPTION):
        try:
            return InfoReply(info, body.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ProtocolViolation(f"{info.name} is not UTF-8: {exc}") from None
    return InfoReply(info, body)


def unpack_rep_server(data: bytes) -> tuple[bytes, bytes]:
    """NBD_REP_SERVER: (name, details)."""
    if len(data) < 4:
        raise ProtocolViolation(f"NBD_REP_SERVER payload of {len(data)} bytes, need at least 4")
    (length,) = struct.unpack_from(">I", data)
    if length > len(data) - 4:
        raise ProtocolViolation(f"NBD_REP_SERVER name length {length} > {len(data) - 4}")
    return data[4 : 4 + length], data[4 + length :]


def unpack_rep_meta_context(data: bytes) -> tuple[int, str]:
    """NBD_REP_META_CONTEXT: (context id, name)."""
    if len(data) < 4:
        raise ProtocolViolation(f"NBD_REP_META_CONTEXT payload of {len(data)} bytes")
    (context_id,) = struct.unpack_from(">I", data)
    try:
        return context_id, data[4:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolViolation(f"meta context name is not UTF-8: {exc}") from None


# ------------------------------------------------------------- transmission

REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY_TAIL = struct.Struct(">HHQI")  # after the magic
EXTENDED_REPLY_TAIL = struct.Struct(">HHQQQ")  # after the magic
MAGIC32 = struct.Struct(">I")


def pack_request(
    cmd: int,
    offset: int,
    length: int,
    *,
    flags: int = 0,
    cookie: int = 0,
    payload: bytes = b"",
    magic: int = REQUEST_MAGIC,
) -> bytes:
    """Transmission / Request message (compact, 28 bytes + payload)."""
    return REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload


def pack_extended_request(
    cmd: int,
    offset: int,
    length: int,
    *,
    flags: int = 0,
    cookie: int = 0,
    payload: bytes = b"",
    magic: int = EXTENDED_REQUEST_MAGIC,
) -> bytes:
    """ext-header extension: the 32-byte extended request + payload."""
    return EXTENDED_REQUEST.pack(magic, flags, cmd, cookie, offset, length) + payload


@dataclass(frozen=True)
class SimpleReply:
    """Transmission / Simple reply message (``data`` only for a successful READ)."""

    error: Errno
    cookie: int
    data: bytes = b""


@dataclass(frozen=True)
class Chunk:
    """A structured (or extended, then ``offset`` is set) reply chunk."""

    flags: ReplyFlag
    type: ReplyType
    cookie: int
    payload: bytes
    offset: int | None = None  # only in extended replies
    magic: int = STRUCTURED_REPLY_MAGIC

    @property
    def done(self) -> bool:
        return bool(self.flags & ReplyFlag.DONE)

    @property
    def extended(self) -> bool:
        return self.magic == EXTENDED_REPLY_MAGIC


@dataclass(frozen=True)
class OffsetData:
    offset: int
    data: bytes


@dataclass(frozen=True)
class OffsetHole:
    offset: int
    size: int


@dataclass(frozen=True)
class BlockStatus:
    """NBD_REPLY_TYPE_BLOCK_STATUS or _EXT: extents as (length, flags) pairs."""

    context_id: int
    extents: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class ChunkError:
    """NBD_REPLY_TYPE_ERROR / ERROR_OFFSET (``offset`` only for the latter)."""

    error: Errno
    message: bytes
    offset: int | None = None


def parse_chunk(chunk: Chunk) -> OffsetData | OffsetHole | BlockStatus | ChunkError | None:
    """Decode a chunk payload per "Structured reply types"; ``None`` for NONE.

    Raises :class:`ProtocolViolation` for a payload whose length breaks the
    rules of its type, and for unknown non-error types.
    """
    p, t = chunk.payload, chunk.type
    if t == ReplyType.NONE:
        if p:
            raise ProtocolViolation(f"NBD_REPLY_TYPE_NONE with length {len(p)}, expected 0")
        return None
    if t == ReplyType.OFFSET_DATA:
        if len(p) < 9:
            raise ProtocolViolation(f"OFFSET_DATA length {len(p)}, expected at least 9")
        return OffsetData(struct.unpack_from(">Q", p)[0], p[8:])
    if t == ReplyType.OFFSET_HOLE:
        if len(p) != 12:
            raise ProtocolViolation(f"OFFSET_HOLE length {len(p)}, expected 12")
        return OffsetHole(*struct.unpack(">QI", p))
    if t == ReplyType.BLOCK_STATUS:
        if len(p) < 12 or (len(p) - 4) % 8:
            raise ProtocolViolation(f"BLOCK_STATUS length {len(p)}, expected 4 + 8*n (n >= 1)")
        (ctx,) = struct.unpack_from(">I", p)
        ext = [struct.unpack_from(">II", p, off) for off in range(4, len(p), 8)]
        return BlockStatus(ctx, ext)
    if t == ReplyType.BLOCK_STATUS_EXT:
        if len(p) < 24 or (len(p) - 8) % 16:
            raise ProtocolViolation(f"BLOCK_STATUS_EXT length {len(p)}, expected 8 + 16*n")
        ctx, count = struct.unpack_from(">II", p)
        if count * 16 + 8 != len(p):
            raise ProtocolViolation(f"BLOCK_STATUS_EXT count {count} for length {len(p)}")
        ext = [struct.unpack_from(">QQ", p, off) for off in range(8, len(p), 16)]
        return BlockStatus(ctx, ext)
    if t.is_error:
        if len(p) < 6:
            raise ProtocolViolation(f"error chunk length {len(p)}, expected at least 6")
        error, msg_len = struct.unpack_from(">IH", p)
        if msg_len > len(p) - 6:
            raise ProtocolViolation(f"error message length {msg_len} > {len(p) - 6}")
        message = p[6 : 6 + msg_len]
        if t == ReplyType.ERROR_OFFSET:
            if len(p) != 6 + msg_len + 8:
                raise ProtocolViolation(f"ERROR_OFFSET length {len(p)}, expected {14 + msg_len}")
            return ChunkError(Errno(error), message, struct.unpack_from(">Q", p, 6 + msg_len)[0])
        return ChunkError(Errno(error), message)
    raise ProtocolViolation(f"unknown structured reply type {t!r}")


def pack_block_status_payload(effect_length: int, context_ids: list[int]) -> bytes:
    """ext-header: NBD_CMD_BLOCK_STATUS payload form (effect length + ids)."""
    return struct.pack(">Q", effect_length) + b"".join(struct.pack(">I", i) for i in context_ids)
