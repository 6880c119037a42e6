"""Byte layouts of every NBD message: pack and unpack, nothing else.

Each layout is quoted from ``proto.md`` ("Protocol phases" for headers,
"Values" for payloads) or from the EXTENDED_HEADERS extension for the 32-byte
request and reply headers.  All integers are big-endian ("Conventions").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from .constants import (
    EXTENDED_REPLY_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    Command,
    Info,
    Option,
    Reply,
    ReplyFlag,
)

# Handshake: NBDMAGIC, IHAVEOPT, 16-bit handshake flags.
GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
# Option request header: IHAVEOPT, option, length.
OPTION_HEADER = struct.Struct(">QII")
# Option reply header: magic, option, reply type, length.
OPTION_REPLY_HEADER = struct.Struct(">QIII")
# NBD_OPT_EXPORT_NAME reply: size, transmission flags (then 124 zero bytes).
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_ZEROES = bytes(124)
# NBD_INFO payloads, including the 16-bit type.
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
INFO_TYPE = struct.Struct(">H")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

# Transmission: compact request (28 bytes) and extended request (32 bytes).
REQUEST = struct.Struct(">IHHQQI")
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
# Both request kinds start with the magic; 4 bytes decide which layout follows.
REQUEST_MAGIC_FIELD = struct.Struct(">I")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_REPLY = struct.Struct(">IHHQI")
EXTENDED_REPLY = struct.Struct(">IHHQQQ")
# Chunk payloads.
OFFSET_DATA_PREFIX = struct.Struct(">Q")
OFFSET_HOLE = struct.Struct(">QI")
ERROR_PREFIX = struct.Struct(">IH")
BLOCK_DESCRIPTOR = struct.Struct(">II")
BLOCK_DESCRIPTOR_EXT = struct.Struct(">QQ")
BLOCK_STATUS_EXT_PREFIX = struct.Struct(">II")


class MalformedPayload(ValueError):
    """An option payload whose declared lengths do not fit its size."""


# ---------------------------------------------------------------- handshake


def pack_greeting(handshake_flags: int) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def pack_option_reply(option: int, reply: Reply, payload: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


def pack_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    tail = b"" if no_zeroes else EXPORT_NAME_ZEROES
    return EXPORT_NAME_REPLY.pack(size, flags) + tail


def pack_rep_server(name: bytes, description: bytes = b"") -> bytes:
    return U32.pack(len(name)) + name + description


def pack_info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(Info.EXPORT, size, flags)


def pack_info_string(info: Info, text: bytes) -> bytes:
    return INFO_TYPE.pack(info) + text


def pack_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def pack_meta_context(context_id: int, name: bytes) -> bytes:
    return U32.pack(context_id) + name


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """Payload of NBD_OPT_INFO and NBD_OPT_GO ("Option types / NBD_OPT_INFO")."""

    name: bytes
    requests: tuple[Info, ...]


def unpack_info_request(payload: bytes) -> InfoRequest:
    if len(payload) < 6:
        raise MalformedPayload(f"payload of {len(payload)} bytes is shorter than 6")
    (name_length,) = U32.unpack_from(payload, 0)
    if name_length > len(payload) - 6:
        raise MalformedPayload(f"name length {name_length} exceeds payload length - 6")
    name = payload[4 : 4 + name_length]
    (count,) = U16.unpack_from(payload, 4 + name_length)
    rest = payload[6 + name_length :]
    if len(rest) != 2 * count:
        raise MalformedPayload(
            f"{count} information requests need {2 * count} bytes, got {len(rest)}"
        )
    requests = tuple(Info(v) for (v,) in U16.iter_unpack(rest))
    return InfoRequest(name, requests)


@dataclass(frozen=True, slots=True)
class MetaContextRequest:
    """Payload of NBD_OPT_LIST/SET_META_CONTEXT ("Option types")."""

    name: bytes
    queries: tuple[bytes, ...]


def unpack_meta_context_request(payload: bytes, max_queries: int) -> MetaContextRequest:
    """Parse export name and queries; every length is checked against the payload."""
    size = len(payload)
    if size < 8:
        raise MalformedPayload(f"payload of {size} bytes is shorter than 8")
    (name_length,) = U32.unpack_from(payload, 0)
    if name_length > size - 8:
        raise MalformedPayload(f"export name length {name_length} exceeds the payload")
    name = payload[4 : 4 + name_length]
    pos = 4 + name_length
    (count,) = U32.unpack_from(payload, pos)
    pos += 4
    # Each query needs at least its 4-byte length: bound the count before looping.
    if count > (size - pos) // 4:
        raise MalformedPayload(f"{count} queries cannot fit in {size - pos} bytes")
    if count > max_queries:
        raise OverflowError(f"{count} queries exceed the limit of {max_queries}")
    queries = []
    for _ in range(count):
        if pos + 4 > size:
            raise MalformedPayload("query length runs past the payload")
        (qlen,) = U32.unpack_from(payload, pos)
        pos += 4
        if qlen > size - pos:
            raise MalformedPayload(f"query length {qlen} runs past the payload")
        queries.append(payload[pos : pos + qlen])
        pos += qlen
    if pos != size:
        raise MalformedPayload(f"{size - pos} trailing bytes after the queries")
    return MetaContextRequest(name, tuple(queries))


# ------------------------------------------------------------- transmission


class RequestHeader(NamedTuple):
    """The header of one transmission request ("Request message"), compact or extended.

    A named tuple rather than a frozen dataclass: one is made per request,
    and a tuple is built four times faster (immutable all the same).
    """

    flags: int  # CommandFlag bits, kept as a plain int: IntFlag arithmetic is slow
    command: Command
    cookie: int
    offset: int
    length: int
    extended: bool = False


# Enum construction costs a microsecond; requests look their command up here.
_COMMANDS = {int(c): c for c in Command}


def _command(number: int) -> Command:
    return _COMMANDS.get(number) or Command(number)


def unpack_request(header: bytes | bytearray | memoryview) -> RequestHeader:
    _, flags, command, cookie, offset, length = REQUEST.unpack_from(header)
    return RequestHeader(flags, _command(command), cookie, offset, length)


def unpack_extended_request(header: bytes | bytearray | memoryview) -> RequestHeader:
    _, flags, command, cookie, offset, length = EXTENDED_REQUEST.unpack_from(header)
    return RequestHeader(flags, _command(command), cookie, offset, length, True)


def pack_simple_reply(error: int, cookie: int) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def pack_chunk_header(
    request: RequestHeader, flags: ReplyFlag, chunk: ChunkType, payload_length: int
) -> bytes:
    """The header of one structured (or, with extended headers, extended) reply chunk."""
    if request.extended:
        return EXTENDED_REPLY.pack(
            EXTENDED_REPLY_MAGIC, flags, chunk, request.cookie, request.offset, payload_length
        )
    return STRUCTURED_REPLY.pack(
        STRUCTURED_REPLY_MAGIC, flags, chunk, request.cookie, payload_length
    )


def pack_error_payload(error: int, message: bytes) -> bytes:
    return ERROR_PREFIX.pack(error, len(message)) + message


def pack_block_status_payload(
    context_id: int, extents: list[tuple[int, int]], extended: bool
) -> bytes:
    """NBD_REPLY_TYPE_BLOCK_STATUS, or BLOCK_STATUS_EXT under extended headers."""
    if extended:
        parts = [BLOCK_STATUS_EXT_PREFIX.pack(context_id, len(extents))]
        parts += [BLOCK_DESCRIPTOR_EXT.pack(length, flags) for length, flags in extents]
    else:
        parts = [U32.pack(context_id)]
        parts += [BLOCK_DESCRIPTOR.pack(length, flags) for length, flags in extents]
    return b"".join(parts)


__all__ = [
    "CLIENT_FLAGS",
    "EXTENDED_REQUEST",
    "OPTION_HEADER",
    "REQUEST",
    "REQUEST_MAGIC_FIELD",
    "InfoRequest",
    "MalformedPayload",
    "MetaContextRequest",
    "Option",
    "RequestHeader",
]
