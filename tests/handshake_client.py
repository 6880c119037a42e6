"""A client of the sans-IO Handshake built from the spec: the harness of tests/test_handshake_*.py.

Bytes in, events and bytes out: no sockets.  Client messages are built here with
``struct`` straight from proto.md ("Protocol phases / Handshake" and "Values /
Handshake phase"), never with reference_server.protocol.wire, so that a layout
bug in wire.py cannot hide itself.  Only the numeric constants are imported.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from reference_server.protocol.constants import ClientFlag, Option, Reply
from reference_server.protocol.events import EnterTransmission, Event, NeedData
from reference_server.protocol.export import ExportInfo
from reference_server.protocol.handshake import Handshake, HandshakeLimits

# "Newstyle negotiation": the magics, spelled out from the spec.
NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
FIXED = ClientFlag.C_FIXED_NEWSTYLE
NO_ZEROES = ClientFlag.C_NO_ZEROES
SIZE = 1 << 20

# ------------------------------------------------------------ client side


def option(number: int, data: bytes = b"", length: int | None = None) -> bytes:
    """C: IHAVEOPT, 32-bit option, 32-bit length, data."""
    return struct.pack(">QII", IHAVEOPT, number, len(data) if length is None else length) + data


def info_data(name: bytes, *infos: int) -> bytes:
    """NBD_OPT_INFO/GO data: name length, name, request count, 16-bit requests."""
    requests = b"".join(struct.pack(">H", i) for i in infos)
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + requests


def meta_data(name: bytes, *queries: bytes) -> bytes:
    """NBD_OPT_LIST/SET_META_CONTEXT data: name, query count, length-prefixed queries."""
    body = b"".join(struct.pack(">I", len(q)) + q for q in queries)
    return struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries)) + body


@dataclass
class OptReply:
    option: int
    type: int
    data: bytes

    @property
    def message(self) -> str:
        return self.data.decode("utf-8")


def parse_replies(data: bytes) -> list[OptReply]:
    """Split server bytes into option replies; every byte must belong to one."""
    replies = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 20, f"truncated option reply header: {data[pos:]!r}"
        magic, opt, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == REPLY_MAGIC, f"expected option reply magic, got {magic:#x}"
        pos += 20
        assert len(data) - pos >= length, "option reply shorter than its length field"
        replies.append(OptReply(opt, rtype, data[pos : pos + length]))
        pos += length
    return replies


class Client:
    """Drives a Handshake the way a client on the wire would."""

    def __init__(
        self,
        exports: Sequence[ExportInfo] = (),
        *,
        flags: int = FIXED | NO_ZEROES,
        tls: bool = False,
        limits: HandshakeLimits | None = None,
        send_flags: bool = True,
    ) -> None:
        if not exports:
            exports = (ExportInfo("", SIZE, description="the default"),)
        self.hs = Handshake({e.name: e for e in exports}, tls_available=tls, limits=limits)
        self.greeting = self.hs.data_to_send()
        self.event: Event = NeedData()
        if send_flags:
            self.event = self.send(struct.pack(">I", flags))
            assert self.hs.data_to_send() == b""

    def send(self, data: bytes) -> Event:
        self.hs.receive_data(data)
        return self.hs.next_event()

    def opt(self, number: int, data: bytes = b"") -> tuple[Event, list[OptReply]]:
        event = self.send(option(number, data))
        return event, parse_replies(self.hs.data_to_send())

    def only(self, number: int, data: bytes = b"") -> OptReply:
        """Send an option that must get exactly one reply and keep haggling."""
        event, replies = self.opt(number, data)
        assert isinstance(event, NeedData), f"expected to keep haggling, got {event}"
        assert len(replies) == 1, f"expected one reply, got {replies}"
        assert replies[0].option == number
        return replies[0]

    def go(self, name: bytes = b"", *infos: int) -> EnterTransmission:
        event, replies = self.opt(Option.GO, info_data(name, *infos))
        assert isinstance(event, EnterTransmission), f"GO failed: {event} {replies}"
        assert replies[-1].type == Reply.ACK
        return event


def assert_still_haggling(c: Client) -> None:
    """A follow-up NBD_OPT_LIST is parsed and answered: the byte stream is in step."""
    event, replies = c.opt(Option.LIST)
    assert isinstance(event, NeedData)
    assert [r.type for r in replies][-1] == Reply.ACK, replies


def infos(replies: list[OptReply]) -> dict[int, bytes]:
    out = {}
    for r in replies:
        if r.type == Reply.INFO:
            (kind,) = struct.unpack_from(">H", r.data)
            assert kind not in out, f"NBD_INFO {kind} sent twice"
            out[kind] = r.data[2:]
    return out
