"""Hypothesis fuzzing of the sans-IO core: Handshake and Transmission.

No backend is involved: the core turns bytes into validated requests and
results into reply bytes, and the tests run each request against a plain
bytearray through the core's own reply builder (:func:`serve`), the way
``reference_server/dispatch.py`` runs it against a backend.

Arbitrary byte streams, and structure-aware streams (valid options and requests
with mutated lengths, magics, flags and payloads, then random byte damage), are
fed in random chunks.  Checked for every example:

* no exception escapes (the core documents none: every client error is an
  option error reply, an NBD error reply, or a Close event);
* the server stays in step with the client's framing: every complete option
  gets exactly one final reply (ACK or error) in order, every complete request
  exactly one final reply with its cookie, and all output parses;
* no state corruption: a shadow copy of the export predicts every successful
  read, and bytes left over after NBD_OPT_GO are exactly the client's.

CI runs a fixed number of derandomized examples (deterministic, well under
20 s).  To fuzz harder, with a seed that is printed and can be replayed:

    NBD_FUZZ_EXAMPLES=20000 NBD_FUZZ_SEED=$RANDOM pytest tests/test_fuzz_core.py -s

A failure prints the seed and a ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from reference_server.protocol.constants import ChunkType, Command, Info, Option, Reply
from reference_server.protocol.events import Close, EnterTransmission, NeedData, StartTLS
from reference_server.protocol.events import Request as RequestEvent
from reference_server.protocol.export import BlockSizes, ExportInfo
from reference_server.protocol.handshake import Handshake, HandshakeLimits
from reference_server.protocol.reply_builder import Buffer
from reference_server.protocol.transmission import Transmission

EXAMPLES = int(os.environ.get("NBD_FUZZ_EXAMPLES", "300"))
SEED = os.environ.get("NBD_FUZZ_SEED")
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=SEED is None,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
F = TypeVar("F", bound=Callable[..., Any])


def fuzz(test: F) -> F:
    """The shared settings, plus the seed when one was asked for."""
    wrapped = FUZZ(test)
    return seed(int(SEED))(wrapped) if SEED is not None else wrapped


@pytest.fixture(autouse=True)
def _report_seed() -> Iterator[None]:
    mode = f"seed={SEED}" if SEED is not None else "derandomized"
    print(f"hypothesis fuzz: {mode} max_examples={EXAMPLES}")
    yield


IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
EXTENDED_MAGIC = 0x6E8A278C
OPTION_LIMIT = 512
MAX_PAYLOAD = 1 << 25
NBD_ERRORS = {1, 5, 12, 22, 28, 75, 95, 108}
SIZE = 256 * 1024

# ------------------------------------------------------------- strategies


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Random damage: (kind, position, value) flips, inserts or deletes a byte."""
    buf = bytearray(data)
    for kind, pos, value in edits:
        if not buf:
            buf.append(value)
            continue
        i = pos % len(buf)
        if kind == 0:
            buf[i] ^= value or 1
        elif kind == 1:
            buf.insert(i, value)
        else:
            del buf[i]
    return bytes(buf)


edits = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4
)
cuts = st.lists(st.integers(0, 1 << 16), max_size=12)
u32 = st.integers(0, 0xFFFFFFFF)
names = st.sampled_from([b"", b"a", b"missing", "é".encode(), b"\xff\xfe", b"x" * 4097])
queries = st.sampled_from(
    [b"base:allocation", b"base:", b"base:x", b"qemu:dirty-bitmap:b", b"nocolon", b""]
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


# ------------------------------------------------------ transmission model


class Run(NamedTuple):
    """An allocation extent as the core reads it (length, NBD_STATE_* flags)."""

    length: int
    flags: int


def extents_of(storage: bytearray, offset: int, length: int) -> list[Run]:
    """4 KiB runs of ``storage``, all-zero ones flagged NBD_STATE_ZERO|HOLE."""
    runs = []
    pos, end = offset, offset + length
    while pos < end:
        stop = min((pos // 4096 + 1) * 4096, end)
        zero = storage.count(0, pos, stop) == stop - pos
        runs.append(Run(stop - pos, 3 if zero else 0))
        pos = stop
    return runs


def serve(tx: Transmission, event: RequestEvent, storage: bytearray) -> list[Buffer]:
    """Run a validated request on ``storage`` and frame its reply with the core alone."""
    replies, header = tx.replies, event.header
    start, end = header.offset, header.offset + header.length
    if header.command == Command.READ:
        extents: list[Run] = []
        if replies.read_wants_extents(header):
            extents = extents_of(storage, start, header.length)
        plan = replies.read(header, extents)
        for region, offset in plan.fills:
            region[:] = storage[offset : offset + len(region)]
        return replies.read_filled(header, plan)
    if header.command == Command.BLOCK_STATUS:
        return replies.block_status(header, extents_of(storage, start, header.length))
    if header.command == Command.WRITE:
        storage[start : start + len(event.payload)] = event.payload
    elif header.command in (Command.TRIM, Command.WRITE_ZEROES):
        storage[start:end] = bytes(header.length)
    return replies.ok(header)


def negotiate(extended: bool, structured: bool, meta: bool, export: ExportInfo) -> Transmission:
    hs = Handshake({export.name: export})
    data = struct.pack(">I", 3)
    if structured:
        data += struct.pack(">QII", IHAVEOPT, Option.STRUCTURED_REPLY, 0)
    if extended:
        data += struct.pack(">QII", IHAVEOPT, Option.EXTENDED_HEADERS, 0)
    if meta:
        q = b"base:allocation"
        body = struct.pack(">III", 0, 1, len(q)) + q
        data += struct.pack(">QII", IHAVEOPT, Option.SET_META_CONTEXT, len(body)) + body
    go = struct.pack(">IHH", 0, 1, Info.BLOCK_SIZE)
    data += struct.pack(">QII", IHAVEOPT, Option.GO, len(go)) + go
    hs.receive_data(data)
    event = hs.next_event()
    assert isinstance(event, EnterTransmission)
    return Transmission(event.negotiated)


offsets = st.one_of(
    st.sampled_from([0, 1, 511, 512, 4096, SIZE - 512, SIZE - 1, SIZE, SIZE + 1, 2**63, 2**64 - 1]),
    st.integers(0, SIZE),
)
lengths = st.one_of(
    st.sampled_from([0, 1, 512, 4096, 65536, SIZE, SIZE + 1, 2**31, 2**32 - 1]),
    st.integers(0, 9000),
)
flag_values = st.one_of(
    st.sampled_from([0, 1, 2, 4, 8, 16, 32, 3, 17, 1 << 6, 1 << 15]), st.integers(0, 0xFFFF)
)


@dataclass
class Req:
    magic: int
    flags: int
    command: int
    cookie: int
    offset: int
    length: int
    data: bytes


@st.composite
def requests(draw: st.DrawFn, extended: bool) -> list[Req]:
    out = []
    for cookie in range(draw(st.integers(1, 10))):
        command = draw(st.one_of(st.integers(0, 9), st.integers(0, 0xFFFF)))
        flags = draw(flag_values)
        offset = draw(offsets)
        length = draw(lengths)
        data = b""
        carries = (flags & 32) if extended else command == Command.WRITE
        if carries and length <= 9000:
            data = draw(st.binary(min_size=length, max_size=length))
        good = EXTENDED_REQUEST_MAGIC if extended else REQUEST_MAGIC
        magic = draw(st.one_of(st.just(good), st.just(good), st.just(good), u32))
        out.append(Req(magic, flags, command, cookie, offset, length, data))
        if carries and length != len(data):
            break  # the payload never comes: nothing after it is framed
    return out


def pack(req: Req, extended: bool) -> bytes:
    if extended:
        head = struct.pack(
            ">IHHQQQ", req.magic, req.flags, req.command, req.cookie, req.offset, req.length
        )
    else:
        head = struct.pack(
            ">IHHQQI",
            req.magic,
            req.flags,
            req.command,
            req.cookie,
            req.offset,
            req.length & 0xFFFFFFFF,
        )
    return head + req.data


def parse_reply_stream(data: bytes, extended: bool, reads: dict[int, int]) -> list[dict[str, Any]]:
    out = []
    pos = 0
    while pos < len(data):
        (magic,) = struct.unpack_from(">I", data, pos)
        if magic == SIMPLE_MAGIC:
            assert not extended
            _, error, cookie = struct.unpack_from(">IIQ", data, pos)
            pos += 16
            n = reads.get(cookie, 0) if error == 0 else 0
            out.append({"cookie": cookie, "done": True, "error": error, "type": None})
            out[-1]["data"] = data[pos : pos + n]
            pos += n
        else:
            if extended:
                assert magic == EXTENDED_MAGIC, f"bad reply magic {magic:#x}"
                _, flags, rtype, cookie, _, length = struct.unpack_from(">IHHQQQ", data, pos)
                pos += 32
            else:
                assert magic == STRUCTURED_MAGIC, f"bad reply magic {magic:#x}"
                _, flags, rtype, cookie, length = struct.unpack_from(">IHHQI", data, pos)
                pos += 20
            payload = data[pos : pos + length]
            assert len(payload) == length, "truncated chunk"
            pos += length
            error = 0
            if rtype & 0x8000:
                error, mlen = struct.unpack_from(">IH", payload)
                assert 6 + mlen <= length
                payload[6 : 6 + mlen].decode("utf-8")
            item = {"cookie": cookie, "done": bool(flags & 1), "error": error, "type": rtype}
            item["payload"] = payload
            out.append(item)
    return out


def check_transmission(reqs: list[Req], extended: bool, structured: bool, meta: bool,
                       read_only: bool, minimum: int, cut: list[int]) -> None:  # fmt: skip
    export = ExportInfo(
        "",
        SIZE,
        read_only=read_only,
        block_sizes=BlockSizes(minimum, max(4096, minimum), 1 << 20),
    )
    tx = negotiate(extended, structured, meta, export)
    storage = bytearray(SIZE)
    shadow = bytearray(SIZE)
    stream = b"".join(pack(r, extended) for r in reqs)
    header = 32 if extended else 28
    good_magic = EXTENDED_REQUEST_MAGIC if extended else REQUEST_MAGIC

    # The model: which requests a correct server frames, and how it ends.
    framed: list[Req] = []
    # A request whose payload never arrives: answered only if it is rejected
    # (a server may answer an invalid request before skipping its payload).
    waiting: Req | None = None
    ending = None
    pos = 0
    for r in reqs:
        if len(stream) - pos < header:
            break
        if r.magic != good_magic:
            ending = "bad magic"
            break
        carries = r.flags & 32 if extended else r.command == Command.WRITE
        declared = r.length if carries else 0
        payload = len(r.data)
        if declared > MAX_PAYLOAD:
            ending = "too big"
            break
        if r.command == Command.DISC:
            ending = "disc"  # nothing after NBD_CMD_DISC is read, a payload included
            break
        if declared != payload:
            waiting = r
            break
        pos += header + payload
        framed.append(r)

    reads = {r.cookie: r.length for r in framed if r.command == Command.READ}
    out = b""
    closed: Close | None = None
    for piece in chunked(stream, cut):
        tx.receive_data(piece)
        while True:
            event = tx.next_event()
            out += b"".join(bytes(b) for b in tx.data_to_send())
            if isinstance(event, NeedData):
                break
            if isinstance(event, Close):
                closed = event
                break
            assert isinstance(event, RequestEvent)
            out += b"".join(bytes(b) for b in serve(tx, event, storage))
        if closed:
            break

    replies = parse_reply_stream(out, extended, reads if not structured else {})
    finals = [r for r in replies if r["done"]]
    cookies = [f["cookie"] for f in finals]
    if waiting is not None and cookies == [r.cookie for r in [*framed, waiting]]:
        assert finals[-1]["error"], "a request was served before its payload arrived"
        framed.append(waiting)
    assert cookies == [r.cookie for r in framed], "requests and replies out of step"
    if ending is None:
        assert closed is None
    else:
        assert closed is not None and closed.clean == (ending == "disc"), (ending, closed)

    # Replay against the shadow export: every successful read must match it.
    chunks_by_cookie: dict[int, list[dict[str, Any]]] = {}
    for item in replies:
        chunks_by_cookie.setdefault(item["cookie"], []).append(item)
    for r, final in zip(framed, finals, strict=True):
        items = chunks_by_cookie[r.cookie]
        chunks_by_cookie[r.cookie] = items[items.index(final) + 1 :]
        items = items[: items.index(final) + 1]
        errors = [i["error"] for i in items if i["error"]]
        for e in errors:
            assert e in NBD_ERRORS, f"error {e} is not an NBD error value"
        if extended or (structured and r.command == Command.READ):
            # Extended: never a simple reply; structured: never for a read.
            assert all(i["type"] is not None for i in items), "simple reply where forbidden"
        if errors:
            continue
        end = r.offset + r.length
        if r.command == Command.WRITE:
            shadow[r.offset : r.offset + len(r.data)] = r.data
        elif r.command in (Command.WRITE_ZEROES, Command.TRIM):
            shadow[r.offset : end] = bytes(r.length)
        elif r.command == Command.READ:
            if not (extended or structured):
                assert items[0]["data"] == shadow[r.offset : end]
                continue
            got = bytearray(r.length)
            covered = 0
            for i in items:
                if i["type"] == ChunkType.OFFSET_DATA:
                    (start,) = struct.unpack_from(">Q", i["payload"])
                    body = i["payload"][8:]
                elif i["type"] == ChunkType.OFFSET_HOLE:
                    start, n = struct.unpack(">QI", i["payload"])
                    body = bytes(n)
                else:
                    continue
                assert r.offset <= start and start + len(body) <= end
                got[start - r.offset : start - r.offset + len(body)] = body
                covered += len(body)
            assert covered == r.length, "read reply does not cover the request"
            assert got == shadow[r.offset : end], "read returned something never written"
    assert storage == shadow, "export differs from the shadow copy"


@st.composite
def transmission_case(draw: st.DrawFn) -> dict[str, Any]:
    extended = draw(st.booleans())
    return {
        "reqs": draw(requests(extended)),
        "extended": extended,
        "structured": draw(st.booleans()),
        "meta": draw(st.booleans()),
        "read_only": draw(st.booleans()),
        "minimum": draw(st.sampled_from([1, 1, 512])),
        "cut": draw(cuts),
    }


@fuzz
@given(case=transmission_case())
def test_transmission_survives_fuzzed_requests(case: dict[str, Any]) -> None:
    if case["meta"]:
        case["structured"] = True  # SET_META_CONTEXT needs structured replies
    check_transmission(**case)


@fuzz
@given(
    extended=st.booleans(),
    structured=st.booleans(),
    data=st.binary(max_size=300),
    cut=cuts,
)
def test_transmission_survives_arbitrary_bytes(
    extended: bool, structured: bool, data: bytes, cut: list[int]
) -> None:
    tx = negotiate(extended, structured, False, ExportInfo("", SIZE))
    storage = bytearray(SIZE)
    out = b""
    for piece in chunked(data, cut):
        tx.receive_data(piece)
        event = tx.next_event()
        while isinstance(event, RequestEvent):
            out += b"".join(bytes(b) for b in tx.data_to_send())
            out += b"".join(bytes(b) for b in serve(tx, event, storage))
            event = tx.next_event()
        out += b"".join(bytes(b) for b in tx.data_to_send())
        assert isinstance(event, NeedData | Close)
        if isinstance(event, Close):
            assert isinstance(tx.next_event(), NeedData)  # closed stays closed
            break
    # Every reply parses (reads: the simple-reply payload length is unknown
    # here, so only structured and extended streams are parsed).
    if extended or structured:
        parse_reply_stream(out, extended, {})
