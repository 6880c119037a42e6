"""Requests and replies with extended headers: 64-bit lengths, NBD_CMD_FLAG_PAYLOAD_LEN.

Unit tests of protocol/transmission.py, driven by tests/transmission_driver.py.
"""

from __future__ import annotations

import struct

from reference_server.protocol.constants import ChunkType, Command, Errno
from tests.transmission_driver import (
    EXTENDED_REQUEST_MAGIC,
    PATTERN,
    PAYLOAD_LEN,
    REQUEST_MAGIC,
    conn,
)

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
