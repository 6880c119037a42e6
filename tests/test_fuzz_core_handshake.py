"""Hypothesis fuzzing of the sans-IO Handshake: arbitrary and mutated option streams.

Every complete option gets exactly one final reply, in order; bytes left over
after NBD_OPT_GO are exactly the client's; no exception escapes.

Settings, seed and shared strategies: tests/core_fuzzing.py (how to fuzz harder too).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from reference_server.protocol.constants import Info, Option, Reply
from reference_server.protocol.events import Close, EnterTransmission, NeedData, StartTLS
from reference_server.protocol.export import BlockSizes, ExportInfo
from reference_server.protocol.handshake import Handshake, HandshakeLimits
from tests.core_fuzzing import (
    IHAVEOPT,
    OPTION_LIMIT,
    REPLY_MAGIC,
    SIZE,
    chunked,
    cuts,
    edits,
    fuzz,
    mutate,
    names,
    queries,
    report_fuzz_seed,  # noqa: F401  (autouse: prints the seed)
    u32,
)


@st.composite
def option_data(draw: st.DrawFn, number: int) -> bytes:
    if number in (Option.INFO, Option.GO):
        infos = draw(st.lists(st.sampled_from([*Info, 0x7777]), max_size=5))
        name = draw(names)
        return (
            struct.pack(">I", len(name))
            + name
            + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos)
        )
    if number in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
        name = draw(names)
        qs = draw(st.lists(queries, max_size=4))
        count = draw(st.one_of(st.just(len(qs)), u32))
        body = b"".join(struct.pack(">I", len(q)) + q for q in qs)
        return struct.pack(">I", len(name)) + name + struct.pack(">I", count) + body
    if number == Option.EXPORT_NAME:
        return draw(names)
    return draw(st.one_of(st.just(b""), st.binary(max_size=40)))


@st.composite
def one_option(draw: st.DrawFn) -> bytes:
    number = draw(st.one_of(st.sampled_from(list(Option)), st.integers(0, 40), u32))
    data = draw(option_data(number))
    length = draw(
        st.one_of(
            st.just(len(data)),
            st.just(len(data)),
            st.integers(0, len(data) + 8),
            st.sampled_from([OPTION_LIMIT, OPTION_LIMIT + 1, 0xFFFFFFFF]),
        )
    )
    magic = draw(st.one_of(st.just(IHAVEOPT), st.just(IHAVEOPT), st.integers(0, 2**64 - 1)))
    return struct.pack(">QII", magic, number, length) + data


@st.composite
def handshake_stream(draw: st.DrawFn) -> bytes:
    flags = draw(st.one_of(st.sampled_from([3, 1, 2, 0]), u32))
    options = draw(st.lists(one_option(), max_size=8))
    return mutate(struct.pack(">I", flags) + b"".join(options), draw(edits))


# --------------------------------------------------------- handshake model


@dataclass
class ClientOption:
    number: int
    end: int  # offset just after its data in the stream
    oversized: bool


def client_options(stream: bytes) -> list[ClientOption]:
    """The options a correct server must frame, in order, as proto.md lays them out."""
    out: list[ClientOption] = []
    pos = 4
    while len(stream) - pos >= 16:
        magic, number, length = struct.unpack_from(">QII", stream, pos)
        if magic != IHAVEOPT:
            break
        if length > OPTION_LIMIT:
            out.append(ClientOption(number, -1, True))
            break
        if len(stream) - pos - 16 < length:
            break
        pos += 16 + length
        out.append(ClientOption(number, pos, False))
    return out


def parse_option_replies(data: bytes) -> tuple[list[tuple[int, int, bytes]], bytes]:
    replies = []
    pos = 0
    while len(data) - pos >= 20:
        magic, opt, rtype, length = struct.unpack_from(">QIII", data, pos)
        if magic != REPLY_MAGIC or len(data) - pos - 20 < length:
            break
        replies.append((opt, rtype, data[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return replies, data[pos:]


EXPORTS = {
    "": ExportInfo("", SIZE, description="default"),
    "a": ExportInfo("a", SIZE, block_sizes=BlockSizes(512, 4096, 1 << 20)),
}


def run_handshake(
    stream: bytes,
    pieces: list[bytes],
    *,
    tls: bool,
    refuse: bool,
    over_tls: bool = False,
) -> tuple[Handshake, object, bytes, int]:
    """Feed ``pieces`` (the whole ``stream``); with ``over_tls``, after a real STARTTLS."""
    hs = Handshake(
        EXPORTS, tls_available=tls, limits=HandshakeLimits(max_option_payload=OPTION_LIMIT)
    )
    assert hs.data_to_send() == b"NBDMAGICIHAVEOPT\x00\x03"
    fed = 0
    if over_tls:
        # The stream's first 4 bytes stand for the client flags sent in clear.
        hs.receive_data(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, Option.STARTTLS, 0))
        assert isinstance(hs.next_event(), StartTLS)
        hs.data_to_send()
        hs.tls_established()
        pieces = chunked(stream[4:], [])
        fed = 4
    if refuse:
        hs.refuse(Reply.ERR_POLICY, "full")
    out = b""
    event: object = NeedData()
    for piece in pieces:
        hs.receive_data(piece)
        fed += len(piece)
        event = hs.next_event()
        out += hs.data_to_send()
        assert isinstance(event, NeedData | Close | EnterTransmission | StartTLS), event
        if not isinstance(event, NeedData):
            break
    return hs, event, out, fed


def check_handshake(
    stream: bytes, pieces: list[bytes], *, tls: bool, refuse: bool, over_tls: bool = False
) -> None:
    hs, event, out, fed = run_handshake(stream, pieces, tls=tls, refuse=refuse, over_tls=over_tls)
    if over_tls:
        stream = struct.pack(">I", 3) + stream[4:]
        # Over TLS: "MUST NOT send NBD_REP_ERR_TLS_REQD"; STARTTLS again is an error.
        for opt, rtype, _ in parse_option_replies(out)[0]:
            assert rtype != Reply.ERR_TLS_REQD
            assert opt != Option.STARTTLS or rtype >> 31, "a second TLS upgrade was accepted"
    if fed < 4:
        assert isinstance(event, NeedData) and out == b""
        return
    flags_ok = not struct.unpack_from(">I", stream)[0] & ~3
    replies, rest = parse_option_replies(out)
    finals = [(opt, rtype) for opt, rtype, _ in replies if rtype == Reply.ACK or rtype >> 31]
    # Informational replies belong to the option whose final reply follows.
    pending = None
    for opt, rtype, payload in replies:
        if rtype >> 31:
            payload.decode("utf-8")  # error messages are strings
            assert len(payload) <= 4096
        if pending is not None:
            assert opt == pending, "replies of two options interleaved"
        pending = None if (rtype == Reply.ACK or rtype >> 31) else opt
    assert pending is None or not isinstance(event, NeedData), "option left unfinished"
    if isinstance(event, EnterTransmission) and rest:
        assert len(rest) in (10, 134), f"trailing bytes that are no reply: {rest!r}"
    else:
        assert rest == b"", f"unparseable server output {rest!r}"
    if not flags_ok:
        # Unknown client flags: "the server MUST drop the TCP connection".
        assert isinstance(event, Close) and out == b"", (event, out)
        return
    expected = client_options(stream[:fed])
    # Options are answered in order, one final reply each, until haggling ends.
    sent = [o.number for o in expected]
    answered = [opt for opt, _ in finals]
    assert answered == sent[: len(answered)], (answered, sent)
    if isinstance(event, NeedData):
        assert len(answered) == len(sent), "a complete option went unanswered"
        assert not any(o.oversized for o in expected)
    if isinstance(event, EnterTransmission):
        negotiated = event.negotiated
        assert negotiated.flags & 1
        if not negotiated.structured_replies:
            assert negotiated.meta_contexts == {}
            assert not negotiated.flags & (1 << 7)
        ender = expected[len(answered) - 1] if finals[-1:] == [(Option.GO, Reply.ACK)] else None
        if ender is None:
            ender = expected[len(answered)]
            assert ender.number == Option.EXPORT_NAME
        assert hs.buffered == stream[ender.end : fed], "bytes after the final option mangled"
    if isinstance(event, Close) and event.clean:
        assert finals[-1] == (Option.ABORT, Reply.ACK)


@fuzz
@given(stream=st.binary(max_size=200), cut=cuts, tls=st.booleans())
def test_handshake_survives_arbitrary_bytes(stream: bytes, cut: list[int], tls: bool) -> None:
    check_handshake(stream, chunked(stream, cut), tls=tls, refuse=False)


@fuzz
@given(stream=handshake_stream(), cut=cuts, tls=st.booleans(), refuse=st.booleans())
def test_handshake_survives_mutated_options(
    stream: bytes, cut: list[int], tls: bool, refuse: bool
) -> None:
    check_handshake(stream, chunked(stream, cut), tls=tls, refuse=refuse)


@fuzz
@given(stream=handshake_stream(), refuse=st.booleans())
def test_handshake_after_tls_established_stays_consistent(stream: bytes, refuse: bool) -> None:
    check_handshake(stream, [], tls=True, refuse=refuse, over_tls=True)
