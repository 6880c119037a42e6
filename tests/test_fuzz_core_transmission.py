"""Hypothesis fuzzing of the sans-IO Transmission: fuzzed requests and arbitrary bytes.

Each request runs against a plain bytearray through the core's own reply
builder (:func:`serve`), the way ``reference_server/dispatch.py`` runs it
against a backend; a shadow copy of the export predicts every successful
read, every complete request gets exactly one final reply with its cookie.

Settings, seed and shared strategies: tests/core_fuzzing.py (how to fuzz harder too).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

from hypothesis import given
from hypothesis import strategies as st

from reference_server.protocol.constants import ChunkType, Command, Info, Option
from reference_server.protocol.events import Close, EnterTransmission, NeedData
from reference_server.protocol.events import Request as RequestEvent
from reference_server.protocol.export import BlockSizes, ExportInfo
from reference_server.protocol.handshake import Handshake
from reference_server.protocol.phases import TransmissionPhase
from reference_server.protocol.reply_builder import Buffer
from reference_server.protocol.transmission import Transmission
from tests.core_fuzzing import (
    EXTENDED_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    MAX_PAYLOAD,
    NBD_ERRORS,
    REQUEST_MAGIC,
    SIMPLE_MAGIC,
    SIZE,
    STRUCTURED_MAGIC,
    chunked,
    cuts,
    fuzz,
    report_fuzz_seed,  # noqa: F401  (autouse: prints the seed)
    u32,
)

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
    if header.command == Command.WRITE and not event.in_store:  # else it is there already
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
                       read_only: bool, minimum: int, cut: list[int],
                       in_store: bool = False) -> None:  # fmt: skip
    export = ExportInfo(
        "",
        SIZE,
        read_only=read_only,
        block_sizes=BlockSizes(minimum, max(4096, minimum), 1 << 20),
    )
    tx = negotiate(extended, structured, meta, export)
    storage = bytearray(SIZE)
    shadow = bytearray(SIZE)
    if in_store:  # write payloads are received straight into the export
        asked: list[tuple[int, int]] = []

        def target(length: int, offset: int) -> memoryview:
            asked.append((length, offset))
            return memoryview(storage)[offset : offset + length]

        tx.write_target = target
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
    cut_short: list[tuple[int, int]] = []  # an accepted write whose payload never all came
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
    elif in_store and tx.phase is TransmissionPhase.RECEIVING_PAYLOAD:
        # Accepted, its payload cut short: what arrived is in the store (by design).
        assert waiting is not None and waiting.command == Command.WRITE
        shadow[waiting.offset : waiting.offset + len(waiting.data)] = waiting.data
        cut_short = [(waiting.length, waiting.offset)]
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
    if in_store:
        accepted = [
            (len(r.data), r.offset)
            for r, f in zip(framed, finals, strict=True)
            if r.command == Command.WRITE and r.data and not f["error"]
        ]
        assert asked == accepted + cut_short, "views asked for other than the accepted writes"


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
        "in_store": draw(st.booleans()),
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
