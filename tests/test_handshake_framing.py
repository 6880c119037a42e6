"""Option haggling's framing: the greeting, client flags, option headers, limits, refusal.

Unit tests of protocol/handshake.py, driven by tests/handshake_client.py.
"""

from __future__ import annotations

import struct

import pytest

from reference_server.protocol.constants import Info, Option, Reply
from reference_server.protocol.events import Close, EnterTransmission, NeedData
from reference_server.protocol.export import ExportInfo
from reference_server.protocol.handshake import HandshakeLimits
from tests.handshake_client import (
    FIXED,
    NBDMAGIC,
    SIZE,
    Client,
    assert_still_haggling,
    info_data,
    option,
    parse_replies,
)

# ---------------------------------------------------------------- greeting


def test_greeting_is_nbdmagic_ihaveopt_fixed_newstyle_no_zeroes() -> None:
    c = Client(send_flags=False)
    assert c.greeting == NBDMAGIC + b"IHAVEOPT" + b"\x00\x03"
    assert isinstance(c.hs.next_event(), NeedData)


def test_client_flags_arriving_a_byte_at_a_time() -> None:
    c = Client(send_flags=False)
    for byte in struct.pack(">I", FIXED)[:3]:
        assert isinstance(c.send(bytes([byte])), NeedData)
    assert isinstance(c.send(b"\x01"), NeedData)
    assert c.only(Option.STRUCTURED_REPLY).type == Reply.ACK


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, FIXED | 1 << 5, 0xFFFFFFFF])
def test_unknown_client_flags_close_the_connection(flags: int) -> None:
    # "Values / Handshake phase / Client flags": "the server MUST drop the TCP
    # connection if the client sets an unknown flag".
    c = Client(send_flags=False)
    event = c.send(struct.pack(">I", flags))
    assert isinstance(event, Close), f"expected Close for client flags {flags:#x}, got {event}"
    assert not event.clean
    assert c.hs.data_to_send() == b""


def test_client_without_fixed_newstyle_may_still_use_export_name() -> None:
    c = Client(flags=0)
    event = c.send(option(Option.EXPORT_NAME))
    assert isinstance(event, EnterTransmission)
    assert len(c.hs.data_to_send()) == 8 + 2 + 124


def test_bad_option_magic_closes() -> None:
    c = Client()
    event = c.send(struct.pack(">QII", 0x1122334455667788, Option.LIST, 0))
    assert isinstance(event, Close) and not event.clean
    assert c.hs.data_to_send() == b""
    # Once closed the machine stays closed.
    assert isinstance(c.send(option(Option.LIST)), Close)


# ------------------------------------------------------ unknown and limits


@pytest.mark.parametrize("number", [0, Option.PEEK_EXPORT, 12, 99, 0xFFFFFFFF])
def test_unknown_options_are_unsupported_and_their_data_skipped(number: int) -> None:
    c = Client()
    reply = c.only(number, b"some data the server must skip")
    assert reply.type == Reply.ERR_UNSUP
    reply.message  # noqa: B018 - error text MUST be UTF-8: decoding raises otherwise
    assert_still_haggling(c)


@pytest.mark.parametrize("length", [64 * 1024 + 1, 1 << 31, 0xFFFFFFFF])
def test_oversized_option_is_too_big_and_closed_without_reading(length: int) -> None:
    c = Client()
    # Only the header is sent: the server must not wait for the payload.
    event = c.send(option(Option.GO, length=length))
    replies = parse_replies(c.hs.data_to_send())
    assert [(r.option, r.type) for r in replies] == [(Option.GO, Reply.ERR_TOO_BIG)]
    assert isinstance(event, Close) and not event.clean


def test_option_payload_at_the_limit_is_read() -> None:
    c = Client(limits=HandshakeLimits(max_option_payload=100))
    assert c.only(Option.LIST, b"x" * 100).type == Reply.ERR_INVALID
    assert_still_haggling(c)


def test_too_many_options_close_the_connection() -> None:
    c = Client(limits=HandshakeLimits(max_options=5))
    for _ in range(5):
        assert c.only(Option.STRUCTURED_REPLY).type == Reply.ACK
    assert isinstance(c.send(option(Option.STRUCTURED_REPLY)), Close)


def test_option_split_across_many_reads() -> None:
    c = Client((ExportInfo("disk", SIZE),))
    data = option(Option.GO, info_data(b"disk", Info.BLOCK_SIZE))
    for i in range(len(data) - 1):
        assert isinstance(c.send(data[i : i + 1]), NeedData)
        assert c.hs.data_to_send() == b""
    assert isinstance(c.send(data[-1:]), EnterTransmission)


def test_several_options_in_one_read_are_all_answered_in_order() -> None:
    c = Client()
    event = c.send(option(Option.STRUCTURED_REPLY) + option(Option.LIST) + option(99))
    assert isinstance(event, NeedData)
    replies = parse_replies(c.hs.data_to_send())
    assert [(r.option, r.type) for r in replies] == [
        (Option.STRUCTURED_REPLY, Reply.ACK),
        (Option.LIST, Reply.SERVER),
        (Option.LIST, Reply.ACK),
        (99, Reply.ERR_UNSUP),
    ]


# ------------------------------------------------------------------ refusal


@pytest.mark.parametrize("reply", [Reply.ERR_POLICY, Reply.ERR_SHUTDOWN])
def test_refused_client_gets_the_error_to_every_option(reply: Reply) -> None:
    # "Termination of the session during option haggling": the server MUST
    # simply error inbound options until the client gets the hint.
    c = Client()
    c.hs.refuse(reply, "go away")
    for number, data in [
        (Option.LIST, b""),
        (Option.INFO, info_data(b"")),
        (Option.GO, info_data(b"")),
        (Option.STRUCTURED_REPLY, b""),
        (99, b""),
    ]:
        r = c.only(number, data)
        assert r.type == reply
        assert r.message == "go away"
    event, replies = c.opt(Option.ABORT)
    assert [r.type for r in replies] == [Reply.ACK]
    assert isinstance(event, Close) and event.clean


def test_refused_client_export_name_is_closed() -> None:
    c = Client()
    c.hs.refuse(Reply.ERR_POLICY, "full")
    assert isinstance(c.send(option(Option.EXPORT_NAME)), Close)
    assert c.hs.data_to_send() == b""


def test_error_messages_are_bounded_utf8() -> None:
    c = Client()
    reply = c.only(Option.GO, info_data("é".encode() * 2000))
    assert reply.type == Reply.ERR_UNKNOWN
    assert len(reply.data) <= 4096
    assert reply.message  # a human-readable reason, valid UTF-8
