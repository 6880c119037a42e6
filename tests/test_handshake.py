"""Unit tests of the sans-IO option-haggling state machine (protocol/handshake.py).

Bytes in, events and bytes out: no sockets.  Client messages are built here with
``struct`` straight from proto.md ("Protocol phases / Handshake" and "Values /
Handshake phase"), never with reference_server.protocol.wire, so that a layout
bug in wire.py cannot hide itself.  Only the numeric constants are imported.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from reference_server.protocol.constants import (
    ClientFlag,
    Info,
    Option,
    Reply,
    TransmissionFlag,
)
from reference_server.protocol.events import (
    Close,
    EnterTransmission,
    Event,
    NeedData,
    StartTLS,
)
from reference_server.protocol.export import BlockSizes, ExportInfo
from reference_server.protocol.handshake import Handshake, HandshakeLimits
from reference_server.protocol.phases import HandshakePhase, LocalProtocolError

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


# ------------------------------------------------------------- EXPORT_NAME


@pytest.mark.parametrize(("flags", "zeroes"), [(FIXED | NO_ZEROES, 0), (FIXED, 124)])
def test_export_name_reply_with_and_without_zeroes(flags: int, zeroes: int) -> None:
    c = Client(flags=flags)
    event = c.send(option(Option.EXPORT_NAME))
    assert isinstance(event, EnterTransmission)
    out = c.hs.data_to_send()
    assert len(out) == 10 + zeroes
    size, tflags = struct.unpack_from(">QH", out)
    assert size == SIZE
    assert tflags == event.negotiated.flags
    assert tflags & TransmissionFlag.HAS_FLAGS
    # No structured replies were negotiated: DF MUST be clear.
    assert not tflags & TransmissionFlag.SEND_DF
    assert out[10:] == bytes(zeroes)


def test_export_name_keeps_transmission_bytes_that_arrived_with_it() -> None:
    c = Client()
    request = b"\x25\x60\x95\x13" + bytes(24)
    event = c.send(option(Option.EXPORT_NAME) + request)
    assert isinstance(event, EnterTransmission)
    assert c.hs.buffered == request


def test_export_name_unknown_export_terminates() -> None:
    # "If the chosen export does not exist ... the server MUST terminate the session."
    c = Client()
    event = c.send(option(Option.EXPORT_NAME, b"nope"))
    assert isinstance(event, Close) and not event.clean
    assert c.hs.data_to_send() == b""


def test_export_name_of_4096_bytes_is_served_and_4097_refused() -> None:
    long_name = "n" * 4096
    exports = (ExportInfo(long_name, SIZE),)
    c = Client(exports)
    assert isinstance(c.send(option(Option.EXPORT_NAME, long_name.encode())), EnterTransmission)
    c = Client(exports)
    event = c.send(option(Option.EXPORT_NAME, long_name.encode() + b"n"))
    assert isinstance(event, Close)


def test_export_name_after_extended_headers_terminates() -> None:
    # Ext-header extension: "Once extended headers are successfully requested,
    # a client MUST NOT use NBD_OPT_EXPORT_NAME"; the server cannot reply an error.
    c = Client()
    assert c.only(Option.EXTENDED_HEADERS).type == Reply.ACK
    assert isinstance(c.send(option(Option.EXPORT_NAME)), Close)


def test_export_name_refused_for_export_with_non_default_block_size() -> None:
    # "Size constraints": such a server MAY refuse NBD_OPT_EXPORT_NAME via a hard disconnect.
    c = Client((ExportInfo("", SIZE, block_sizes=BlockSizes(512, 4096, 1 << 25)),))
    assert isinstance(c.send(option(Option.EXPORT_NAME)), Close)


def test_next_event_after_transmission_started_is_close() -> None:
    c = Client()
    c.go()
    assert isinstance(c.send(option(Option.LIST)), Close)
    assert c.hs.data_to_send() == b""


# ------------------------------------------------------------------ ABORT


@pytest.mark.parametrize("data", [b"", b"ignored data"])
def test_abort_is_acked_then_a_soft_disconnect(data: bytes) -> None:
    # "NBD_OPT_ABORT": "The server MUST reply with NBD_REP_ACK"; data SHOULD be ignored.
    c = Client()
    event, replies = c.opt(Option.ABORT, data)
    assert [(r.option, r.type, r.data) for r in replies] == [(Option.ABORT, Reply.ACK, b"")]
    assert isinstance(event, Close) and event.clean


# ------------------------------------------------------------------- LIST


def test_list_returns_each_export_with_description_then_ack() -> None:
    exports = (ExportInfo("", SIZE, description="default"), ExportInfo("disk", SIZE))
    c = Client(exports)
    event, replies = c.opt(Option.LIST)
    assert isinstance(event, NeedData)
    assert [r.type for r in replies] == [Reply.SERVER, Reply.SERVER, Reply.ACK]
    listed = {}
    for r in replies[:2]:
        (n,) = struct.unpack_from(">I", r.data)
        assert n <= len(r.data) - 4
        listed[r.data[4 : 4 + n]] = r.data[4 + n :]
    assert listed == {b"": b"default", b"disk": b""}


def test_list_with_data_is_invalid_and_haggling_continues() -> None:
    c = Client()
    assert c.only(Option.LIST, b"x").type == Reply.ERR_INVALID
    assert_still_haggling(c)


# ---------------------------------------------------------------- STARTTLS


def test_starttls_in_notls_mode_is_policy_never_tls_reqd() -> None:
    # "NOTLS mode": reply ERR_POLICY (or UNSUP); "MUST NOT respond to any option
    # request with NBD_REP_ERR_TLS_REQD".
    c = Client()
    assert c.only(Option.STARTTLS).type == Reply.ERR_POLICY
    for number in (Option.INFO, Option.LIST, 99):
        data = info_data(b"") if number == Option.INFO else b""
        _, replies = c.opt(number, data)
        assert Reply.ERR_TLS_REQD not in [r.type for r in replies]


def test_starttls_with_data_is_invalid() -> None:
    c = Client(tls=True)
    assert c.only(Option.STARTTLS, b"x").type == Reply.ERR_INVALID


@pytest.mark.parametrize(
    ("number", "data"),
    [
        (Option.INFO, info_data(b"")),
        (Option.GO, info_data(b"")),
        (Option.LIST, b""),
        (Option.STRUCTURED_REPLY, b""),
        (Option.EXTENDED_HEADERS, b""),
        (Option.LIST_META_CONTEXT, meta_data(b"")),
        (Option.SET_META_CONTEXT, meta_data(b"", b"base:allocation")),
        (99, b""),
    ],
)
def test_forcedtls_errors_every_option_with_tls_reqd(number: int, data: bytes) -> None:
    # "FORCEDTLS mode": any other option, INFO and unsupported ones included,
    # MUST get NBD_REP_ERR_TLS_REQD, and GO MUST error with it too.
    c = Client(tls=True)
    reply = c.only(number, data)
    assert reply.type == Reply.ERR_TLS_REQD


def test_forcedtls_abort_is_still_acked() -> None:
    c = Client(tls=True)
    event, replies = c.opt(Option.ABORT)
    assert [r.type for r in replies] == [Reply.ACK]
    assert isinstance(event, Close) and event.clean


def test_forcedtls_export_name_before_tls_terminates() -> None:
    c = Client(tls=True)
    assert isinstance(c.send(option(Option.EXPORT_NAME)), Close)
    assert c.hs.data_to_send() == b""


def test_forcedtls_client_without_fixed_newstyle_is_closed() -> None:
    c = Client(tls=True, send_flags=False)
    assert isinstance(c.send(struct.pack(">I", 0)), Close)


def test_forcedtls_starttls_then_negotiation_restarts_from_scratch() -> None:
    c = Client(tls=True)
    # A GO smuggled in clear right behind STARTTLS must not be acted on
    # ("Protocol downgrade attacks").
    event = c.send(option(Option.STARTTLS) + option(Option.GO, info_data(b"")))
    assert isinstance(event, StartTLS)
    assert [(r.option, r.type) for r in parse_replies(c.hs.data_to_send())] == [
        (Option.STARTTLS, Reply.ACK)
    ]
    # Bytes that arrive while the TLS handshake runs are not option requests.
    assert isinstance(c.send(option(Option.GO, info_data(b""))), NeedData)
    assert c.hs.data_to_send() == b""
    c.hs.tls_established()
    assert isinstance(c.hs.next_event(), NeedData)
    assert c.hs.data_to_send() == b""
    # Over TLS: options work, TLS_REQD never appears, a second STARTTLS is invalid.
    assert c.only(Option.STARTTLS).type == Reply.ERR_INVALID
    assert_still_haggling(c)
    assert c.go().negotiated.export.name == ""


def test_forcedtls_full_negotiation_after_starttls() -> None:
    c = Client(tls=True)
    assert isinstance(c.send(option(Option.STARTTLS)), StartTLS)
    c.hs.data_to_send()
    c.hs.tls_established()
    assert c.only(Option.STRUCTURED_REPLY).type == Reply.ACK
    reply_types = [
        r.type for r in c.opt(Option.SET_META_CONTEXT, meta_data(b"", b"base:allocation"))[1]
    ]
    assert reply_types == [Reply.META_CONTEXT, Reply.ACK]
    negotiated = c.go().negotiated
    assert negotiated.structured_replies
    assert list(negotiated.meta_contexts.values()) == ["base:allocation"]


def test_tls_established_resets_state_negotiated_before() -> None:
    # Negotiating structured replies in clear is impossible in FORCEDTLS (the
    # option gets ERR_TLS_REQD); exercise the reset directly, as if a bug had
    # let the option take effect: state set, STARTTLS, then tls_established.
    c = Client(tls=True)
    c.hs._structured = True
    assert isinstance(c.send(option(Option.STARTTLS)), StartTLS)
    c.hs.data_to_send()
    c.hs.tls_established()
    negotiated = c.go().negotiated
    assert not negotiated.structured_replies
    assert not negotiated.flags & TransmissionFlag.SEND_DF


def test_tls_established_without_starttls_is_a_local_error() -> None:
    # The transport may report TLS only after StartTLS: anything else is a bug
    # in the caller, not the client, and the phase does not change.
    c = Client()
    with pytest.raises(LocalProtocolError, match="TLS_ESTABLISHED is not allowed in HAGGLING"):
        c.hs.tls_established()
    assert c.hs.phase is HandshakePhase.HAGGLING
    assert_still_haggling(c)


# ------------------------------------------------------------ INFO and GO


def test_info_reports_export_and_block_size_then_ack_without_ending_haggling() -> None:
    c = Client()
    event, replies = c.opt(Option.INFO, info_data(b""))
    assert isinstance(event, NeedData)
    assert replies[-1].type == Reply.ACK
    assert all(r.option == Option.INFO for r in replies)
    got = infos(replies)
    assert len(got[Info.EXPORT]) == 10  # header length 12 incl. the type
    size, flags = struct.unpack(">QH", got[Info.EXPORT])
    assert size == SIZE
    assert flags & TransmissionFlag.HAS_FLAGS
    assert struct.unpack(">III", got[Info.BLOCK_SIZE]) == (1, 4096, 1 << 25)
    assert_still_haggling(c)


def test_info_then_go_with_same_parameters_report_the_same_information() -> None:
    c = Client()
    _, first = c.opt(Option.INFO, info_data(b"", Info.BLOCK_SIZE))
    event, second = c.opt(Option.GO, info_data(b"", Info.BLOCK_SIZE))
    assert isinstance(event, EnterTransmission)
    assert infos(first) == infos(second)


def test_go_name_and_description_information_requests() -> None:
    c = Client((ExportInfo("disk", SIZE, description="a test disk"),))
    event, replies = c.opt(Option.GO, info_data(b"disk", Info.NAME, Info.DESCRIPTION, 0x7777))
    assert isinstance(event, EnterTransmission)
    got = infos(replies)
    assert got[Info.NAME] == b"disk"
    assert got[Info.DESCRIPTION] == b"a test disk"
    assert 0x7777 not in got  # an unknown request is ignored, never answered
    assert replies[-1].type == Reply.ACK
    assert event.negotiated.export.name == "disk"
    # "The server MUST NOT send any zero padding bytes after the NBD_REP_ACK".
    assert c.hs.data_to_send() == b""


def test_go_unknown_export_is_err_unknown_with_no_info() -> None:
    c = Client()
    event, replies = c.opt(Option.GO, info_data(b"missing", Info.NAME))
    assert isinstance(event, NeedData)
    assert [r.type for r in replies] == [Reply.ERR_UNKNOWN]
    assert_still_haggling(c)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00",
        struct.pack(">I", 0) + b"\x00",  # count missing one byte
        struct.pack(">I", 7) + b"abc" + struct.pack(">H", 0),  # name runs past the payload
        struct.pack(">I", 0xFFFFFFFF) + struct.pack(">H", 0),
        struct.pack(">IH", 0, 2) + struct.pack(">H", Info.NAME),  # one request short
        struct.pack(">IH", 0, 0) + b"\x00",  # trailing byte
    ],
)
@pytest.mark.parametrize("number", [Option.INFO, Option.GO])
def test_malformed_info_and_go_are_invalid(number: int, data: bytes) -> None:
    c = Client()
    reply = c.only(number, data)
    assert reply.type == Reply.ERR_INVALID
    assert_still_haggling(c)


@pytest.mark.parametrize("number", [Option.INFO, Option.GO])
def test_export_names_of_4096_bytes_work_and_4097_are_refused(number: int) -> None:
    name = "x" * 4096
    c = Client((ExportInfo(name, SIZE),))
    event, replies = c.opt(number, info_data(name.encode()))
    assert replies[-1].type == Reply.ACK
    c = Client((ExportInfo(name, SIZE),))
    event, replies = c.opt(number, info_data(name.encode() + b"x"))
    assert isinstance(event, NeedData)
    # "Conventions": strings MUST be no longer than 4096 bytes.
    assert [r.type for r in replies] in ([Reply.ERR_INVALID], [Reply.ERR_TOO_BIG])
    assert_still_haggling(c)


def test_go_on_export_with_minimum_block_size_requires_block_size_request() -> None:
    export = ExportInfo("", SIZE, block_sizes=BlockSizes(512, 4096, 1 << 20))
    c = Client((export,))
    event, replies = c.opt(Option.GO, info_data(b""))
    assert isinstance(event, NeedData)
    assert replies[-1].type == Reply.ERR_BLOCK_SIZE_REQD
    # "SHOULD ensure it first sends an NBD_INFO_BLOCK_SIZE information reply".
    assert struct.unpack(">III", infos(replies)[Info.BLOCK_SIZE]) == (512, 4096, 1 << 20)
    # INFO alone commits to nothing and is answered; GO with BLOCK_SIZE succeeds.
    _, replies = c.opt(Option.INFO, info_data(b""))
    assert replies[-1].type == Reply.ACK
    negotiated = c.go(b"", Info.BLOCK_SIZE).negotiated
    assert negotiated.block_sizes_agreed


def test_go_without_block_size_request_on_default_export_is_not_agreed() -> None:
    c = Client()
    assert not c.go().negotiated.block_sizes_agreed
    c = Client()
    assert c.go(b"", Info.BLOCK_SIZE).negotiated.block_sizes_agreed


def test_transmission_flags_of_read_only_and_multi_conn_exports() -> None:
    ro = ExportInfo("", SIZE, read_only=True, multi_conn=True)
    negotiated = Client((ro,)).go().negotiated
    flags = negotiated.flags
    assert flags & TransmissionFlag.READ_ONLY
    assert flags & TransmissionFlag.CAN_MULTI_CONN
    for write_only in (
        TransmissionFlag.SEND_TRIM,
        TransmissionFlag.SEND_WRITE_ZEROES,
        TransmissionFlag.SEND_FAST_ZERO,
    ):
        assert not flags & write_only
    rw = Client((ExportInfo("", SIZE),)).go().negotiated.flags
    assert not rw & (TransmissionFlag.READ_ONLY | TransmissionFlag.CAN_MULTI_CONN)
    assert rw & TransmissionFlag.SEND_TRIM and rw & TransmissionFlag.SEND_WRITE_ZEROES


# -------------------------------------------------------- STRUCTURED_REPLY


def test_structured_reply_is_acked_and_enables_df() -> None:
    c = Client()
    assert c.only(Option.STRUCTURED_REPLY).type == Reply.ACK
    negotiated = c.go().negotiated
    assert negotiated.structured_replies and not negotiated.extended_headers
    assert negotiated.flags & TransmissionFlag.SEND_DF


def test_structured_reply_with_data_is_invalid_and_not_negotiated() -> None:
    c = Client()
    assert c.only(Option.STRUCTURED_REPLY, b"\x00").type == Reply.ERR_INVALID
    assert not c.go().negotiated.structured_replies


def test_structured_reply_after_extended_headers_is_ext_header_reqd() -> None:
    c = Client()
    assert c.only(Option.EXTENDED_HEADERS).type == Reply.ACK
    assert c.only(Option.STRUCTURED_REPLY).type == Reply.ERR_EXT_HEADER_REQD
    negotiated = c.go().negotiated
    assert negotiated.extended_headers and negotiated.structured_replies


# -------------------------------------------------------- EXTENDED_HEADERS


def test_extended_headers_after_structured_reply_take_precedence() -> None:
    c = Client()
    assert c.only(Option.STRUCTURED_REPLY).type == Reply.ACK
    assert c.only(Option.EXTENDED_HEADERS).type == Reply.ACK
    negotiated = c.go().negotiated
    assert negotiated.extended_headers
    assert negotiated.flags & TransmissionFlag.SEND_DF


def test_extended_headers_with_data_is_invalid_and_not_negotiated() -> None:
    c = Client()
    assert c.only(Option.EXTENDED_HEADERS, b"\x00\x00").type == Reply.ERR_INVALID
    assert not c.go().negotiated.extended_headers


# ------------------------------------------------------ LIST_META_CONTEXT


def contexts(replies: list[OptReply]) -> list[tuple[int, bytes]]:
    out = []
    for r in replies:
        if r.type == Reply.META_CONTEXT:
            (cid,) = struct.unpack_from(">I", r.data)
            out.append((cid, r.data[4:]))
    return out


@pytest.mark.parametrize(
    ("queries", "listed"),
    [
        ((), [b"base:allocation"]),
        ((b"base:",), [b"base:allocation"]),
        ((b"base:allocation",), [b"base:allocation"]),
        ((b"base:nonsense",), []),
        ((b"x-unknown:thing",), []),
        ((b"qemu:dirty-bitmap:b", b"base:allocation"), [b"base:allocation"]),
    ],
)
def test_list_meta_context(queries: tuple[bytes, ...], listed: list[bytes]) -> None:
    c = Client()
    assert c.only(Option.STRUCTURED_REPLY).type == Reply.ACK
    event, replies = c.opt(Option.LIST_META_CONTEXT, meta_data(b"", *queries))
    assert isinstance(event, NeedData)
    assert replies[-1].type == Reply.ACK
    assert [name for _, name in contexts(replies)] == listed


def test_list_meta_context_does_not_select_anything() -> None:
    c = Client()
    c.only(Option.STRUCTURED_REPLY)
    c.opt(Option.LIST_META_CONTEXT, meta_data(b"", b"base:allocation"))
    assert c.go().negotiated.meta_contexts == {}


# Syntactically invalid payloads: "the server MUST fail the request with
# NBD_REP_ERR_INVALID" (NBD_OPT_LIST_META_CONTEXT).
MALFORMED_META = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x00" * 7, id="seven-bytes"),
    pytest.param(struct.pack(">I", 5) + b"ab" + struct.pack(">I", 0), id="name-past-end"),
    pytest.param(struct.pack(">II", 0, 1), id="query-count-without-query"),
    pytest.param(struct.pack(">II", 0, 0xFFFFFFFF), id="huge-query-count"),
    pytest.param(struct.pack(">III", 0, 1, 20) + b"base:", id="query-length-past-end"),
    pytest.param(struct.pack(">III", 0, 1, 2) + b"ab" + b"zz", id="trailing-bytes"),
    pytest.param(
        struct.pack(">III", 0, 2, 15) + b"base:allocation" + b"\x00\x00", id="truncated-length"
    ),
]


@pytest.mark.parametrize("data", MALFORMED_META)
@pytest.mark.parametrize("number", [Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT])
def test_malformed_meta_context_lengths_are_invalid(number: int, data: bytes) -> None:
    c = Client()
    c.only(Option.STRUCTURED_REPLY)
    assert c.only(number, data).type == Reply.ERR_INVALID
    assert_still_haggling(c)


@pytest.mark.parametrize("number", [Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT])
def test_meta_context_for_unknown_export_is_err_unknown(number: int) -> None:
    c = Client()
    c.only(Option.STRUCTURED_REPLY)
    assert c.only(number, meta_data(b"missing", b"base:allocation")).type == Reply.ERR_UNKNOWN


@pytest.mark.parametrize("number", [Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT])
def test_meta_context_query_without_namespace_colon_is_invalid(number: int) -> None:
    c = Client()
    c.only(Option.STRUCTURED_REPLY)
    assert c.only(number, meta_data(b"", b"allocation")).type == Reply.ERR_INVALID


def test_too_many_meta_context_queries_is_too_big() -> None:
    c = Client(limits=HandshakeLimits(max_meta_queries=4))
    c.only(Option.STRUCTURED_REPLY)
    data = meta_data(b"", *([b"base:allocation"] * 5))
    assert c.only(Option.LIST_META_CONTEXT, data).type == Reply.ERR_TOO_BIG
    _event, replies = c.opt(Option.LIST_META_CONTEXT, meta_data(b"", *([b"base:"] * 4)))
    assert replies[-1].type == Reply.ACK


def test_meta_context_query_longer_than_4096_is_refused() -> None:
    c = Client()
    c.only(Option.STRUCTURED_REPLY)
    reply = c.only(Option.LIST_META_CONTEXT, meta_data(b"", b"base:" + b"a" * 4092))
    assert reply.type in (Reply.ERR_INVALID, Reply.ERR_TOO_BIG)


# ------------------------------------------------------- SET_META_CONTEXT


def test_set_meta_context_without_structured_replies_is_invalid() -> None:
    # "This option MUST NOT be requested unless structured replies have been
    # negotiated first ... a server SHOULD send NBD_REP_ERR_INVALID".
    c = Client()
    assert c.only(Option.SET_META_CONTEXT, meta_data(b"", b"base:allocation")).type == (
        Reply.ERR_INVALID
    )
    assert c.go().negotiated.meta_contexts == {}


@pytest.mark.parametrize("first", [Option.STRUCTURED_REPLY, Option.EXTENDED_HEADERS])
def test_set_meta_context_selects_base_allocation_for_go(first: int) -> None:
    c = Client()
    assert c.only(first).type == Reply.ACK
    _event, replies = c.opt(Option.SET_META_CONTEXT, meta_data(b"", b"base:allocation"))
    assert [r.type for r in replies] == [Reply.META_CONTEXT, Reply.ACK]
    [(cid, name)] = contexts(replies)
    assert name == b"base:allocation"
    assert c.go().negotiated.meta_contexts == {cid: "base:allocation"}


@pytest.mark.parametrize("queries", [(), (b"base:",), (b"base:other",), (b"x-foo:bar",)], ids=str)
def test_set_meta_context_selecting_nothing_is_just_ack(queries: tuple[bytes, ...]) -> None:
    # "base:" MUST be ignored during SET; unknown leaves and namespaces are ignored.
    c = Client()
    c.only(Option.STRUCTURED_REPLY)
    _event, replies = c.opt(Option.SET_META_CONTEXT, meta_data(b"", *queries))
    assert [r.type for r in replies] == [Reply.ACK]
    assert c.go().negotiated.meta_contexts == {}


def test_set_meta_context_counts_only_for_the_export_it_named() -> None:
    exports = (ExportInfo("a", SIZE), ExportInfo("b", SIZE))
    c = Client(exports)
    c.only(Option.STRUCTURED_REPLY)
    c.opt(Option.SET_META_CONTEXT, meta_data(b"a", b"base:allocation"))
    assert c.go(b"b").negotiated.meta_contexts == {}


def test_failed_set_meta_context_clears_earlier_selection() -> None:
    # "Issuing this command replaces all previously-set metadata contexts
    # (including when this command fails)".
    c = Client()
    c.only(Option.STRUCTURED_REPLY)
    _, replies = c.opt(Option.SET_META_CONTEXT, meta_data(b"", b"base:allocation"))
    assert replies[-1].type == Reply.ACK
    assert c.only(Option.SET_META_CONTEXT, b"\x00").type == Reply.ERR_INVALID
    assert c.go().negotiated.meta_contexts == {}


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
