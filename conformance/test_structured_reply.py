"""Structured replies: negotiation, READ chunk rules, DF, block status replies.

Raw-wire checks (conformance.wire): libnbd reassembles chunks and hides their
layout; these checks look at every chunk the server sends.
"""

from __future__ import annotations

import contextlib

import pytest

from conformance.spec import MUST, SHOULD, expect, expect_data, expect_equal, spec, unsupported
from conformance.wire import (
    BASE_ALLOCATION,
    AllocationState,
    Cmd,
    CmdFlag,
    Errno,
    Opt,
    ProtocolViolation,
    Rep,
    ReplyType,
    TransmissionFlag,
)
from conformance.wire import messages as m
from conformance.wire import session as s
from conformance.wire.constants import STRING_MAX, STRUCTURED_REPLY_MAGIC

BLOCK = 4096
# Data in blocks 1 and 3, holes (never written) in blocks 0, 2, 4..15.
PATTERN = {1: bytes(range(256)) * 16, 3: b"\xa5" * BLOCK}
SPAN = 16 * BLOCK


def _expected_span() -> bytes:
    return b"".join(PATTERN.get(i, bytes(BLOCK)) for i in range(SPAN // BLOCK))


@contextlib.contextmanager
def structured(server, *, meta: bool = False, write: bool = False):
    """A transmission-phase client with structured replies (and base:allocation)."""
    client = s.negotiated(server)
    try:
        result = client.structured_reply()
        if result.type == Rep.ERR_UNSUP:
            unsupported("the server does not support NBD_OPT_STRUCTURED_REPLY")
        expect_equal(result.type.name, "ACK", "reply to NBD_OPT_STRUCTURED_REPLY")
        name = s.export_name(server)
        context_id = None
        if meta:
            selected = client.set_meta_context(name, (BASE_ALLOCATION.encode(),))
            if BASE_ALLOCATION not in selected.contexts:
                unsupported(f"the server does not offer base:allocation ({selected.describe()})")
            context_id = selected.contexts[BASE_ALLOCATION]
        go = client.go(name)
        expect_equal(go.type.name, "ACK", "reply to NBD_OPT_GO")
        if write:
            for block, data in PATTERN.items():
                expect_equal(client.write(block * BLOCK, data).error, Errno.OK, "WRITE")
        yield client, go.export, context_id
    finally:
        client.close()


def _span_reply(server, flags: int = 0, length: int = SPAN):
    with structured(server, write=True) as (client, export, _):
        return client.read(0, length, flags), export


# -------------------------------------------------------------- negotiation


@spec(
    "Values / Handshake phase / Option types",
    SHOULD,
    "The client MUST NOT send any additional data with the option, and the server SHOULD reject "
    "a request that includes data with `NBD_REP_ERR_INVALID`.",
)
def test_structured_reply_with_data_gets_err_invalid(server):
    client = s.negotiated(server)
    try:
        result = client.option(Opt.STRUCTURED_REPLY, b"junk")
        if result.type == Rep.ERR_UNSUP:
            unsupported("the server does not support NBD_OPT_STRUCTURED_REPLY")
        expect_equal(result.type.name, "ERR_INVALID", "NBD_OPT_STRUCTURED_REPLY with data")
    finally:
        client.close()


@spec(
    "Protocol phases / Transmission / Simple reply message",
    MUST,
    "The simple reply message MUST be sent by the server in response to all requests if "
    "structured replies have not been negotiated using `NBD_OPT_STRUCTURED_REPLY`.",
)
@pytest.mark.parametrize("case", ["read", "read-out-of-bounds", "flush"])
def test_simple_replies_without_negotiation(server, case):
    client, export = s.transmission(server)
    try:
        size, flags = export.size, export.flags
        if case == "flush" and not flags & TransmissionFlag.SEND_FLUSH:
            unsupported("the server does not advertise NBD_FLAG_SEND_FLUSH")
        cmd, offset = (Cmd.FLUSH, 0) if case == "flush" else (Cmd.READ, 0)
        if case == "read-out-of-bounds":
            offset = size
        reply = client.request(cmd, offset, 0 if cmd == Cmd.FLUSH else 512)
        expect(reply.is_simple, f"reply to {case}", "a simple reply", reply.messages)
    finally:
        client.disconnect()


# ------------------------------------------------------------- READ chunks

READ_RULES = (
    "The server MUST NOT send content chunks that overlap with any earlier content or error "
    "chunk, and MUST NOT send chunks that describe data outside the offset and length of the "
    "request, but MAY send the content chunks in any order (the client MUST reassemble content "
    "chunks into the correct order), and MAY send additional content chunks even after reporting "
    "an error chunk."
)


@spec(
    "Protocol phases / Transmission / Structured reply chunk message",
    MUST,
    "Conversely, if structured replies are negotiated, the server MUST use a structured reply for "
    "any response with a payload, and MUST NOT use a simple reply for `NBD_CMD_READ` (even for the "
    "case of an early `NBD_EINVAL` due to bad flags), but MAY use either a simple reply or a "
    "structured reply to all other requests.",
)
@pytest.mark.parametrize("case", ["ok", "out-of-bounds", "unknown-flag"])
def test_read_reply_is_structured(server, case):
    with structured(server) as (client, export, _):
        offset, flags = (export.size, 0) if case == "out-of-bounds" else (0, 0)
        if case == "unknown-flag":
            flags = 1 << 14
        reply = client.read(offset, 512, flags)
        magics = [hex(getattr(msg, "magic", 0)) for msg in reply.messages]
        expect(
            reply.chunks and len(reply.chunks) == len(reply.messages),
            f"READ reply ({case})",
            f"structured chunks ({STRUCTURED_REPLY_MAGIC:#x})",
            magics,
        )
        if case == "out-of-bounds":
            expect(reply.error != Errno.OK, f"READ ({case})", "an error chunk", reply.messages)


@spec(
    "Protocol phases / Transmission / Structured reply chunk message",
    MUST,
    "Unless further documented by individual requests below, the chunks MAY be sent in any order, "
    "except that the chunk with the flag `NBD_REPLY_FLAG_DONE` MUST be sent last.",
)
@pytest.mark.writes
def test_read_done_chunk_is_last(server):
    with structured(server, write=True) as (client, _, _):
        first = client.send_request(Cmd.READ, 0, SPAN)
        reply = client.reply(first)
        client.reply(client.send_request(Cmd.READ, 0, 512))
        late = [c.type.name for c in client.stray(first)]
        expect_equal(
            late, [], f"chunks for a READ after its DONE chunk ({len(reply.chunks)} before)"
        )


@spec("Values / Transmission phase / Request types", MUST, READ_RULES)
@pytest.mark.writes
def test_read_chunks_lie_within_request(server):
    offset, length = BLOCK // 2, SPAN - BLOCK  # unaligned on purpose
    with structured(server, write=True) as (client, _, _):
        reply = client.read(offset, length)
    for item in reply.parsed():
        if isinstance(item, m.OffsetData | m.OffsetHole):
            end = item.offset + (len(item.data) if isinstance(item, m.OffsetData) else item.size)
            expect(
                offset <= item.offset and end <= offset + length,
                "content chunk bounds",
                f"within [{offset}, {offset + length})",
                f"[{item.offset}, {end})",
            )


@spec("Values / Transmission phase / Request types", MUST, READ_RULES)
@pytest.mark.writes
def test_read_chunks_do_not_overlap(server):
    reply, _ = _span_reply(server)
    seen: list[tuple[int, int]] = []
    for item in reply.parsed():
        if isinstance(item, m.OffsetData | m.OffsetHole):
            end = item.offset + (len(item.data) if isinstance(item, m.OffsetData) else item.size)
            for a, b in seen:
                expect(
                    end <= a or b <= item.offset,
                    "content chunks",
                    "no overlap",
                    f"[{item.offset}, {end}) overlaps [{a}, {b})",
                )
            seen.append((item.offset, end))


@spec(
    "Values / Transmission phase / Request types",
    MUST,
    "When no error is detected, the server MUST send enough data chunks to cover the entire "
    "region described by the offset and length of the client's request.",
)
@pytest.mark.writes
def test_read_chunks_cover_request(server):
    reply, _ = _span_reply(server)
    expect_equal(reply.error, Errno.OK, "READ error")
    covered = 0
    for item in reply.parsed():
        if isinstance(item, m.OffsetData):
            covered += len(item.data)
        elif isinstance(item, m.OffsetHole):
            covered += item.size
    expect_equal(covered, SPAN, "bytes covered by content chunks")


@spec("Values / Transmission phase / Request types", MUST)
@pytest.mark.writes
def test_structured_read_returns_written_data(server):
    """Reassembled OFFSET_DATA and OFFSET_HOLE chunks read back what was written."""
    reply, _ = _span_reply(server)
    try:
        data = reply.data(0, SPAN)
    except ProtocolViolation as exc:
        expect(False, "READ chunks", "a valid reassembly", str(exc))
    expect_data(data, _expected_span(), "READ of written data and holes")


@spec("Values / Transmission phase / Structured reply types", MUST)
@pytest.mark.writes
def test_read_chunks_are_well_formed(server):
    """OFFSET_DATA: "*length* MUST be at least 9"; OFFSET_HOLE: "*length* MUST be exactly 12",
    hole size "MUST be nonzero"; NONE: length 0 with NBD_REPLY_FLAG_DONE."""
    reply, _ = _span_reply(server)
    for chunk in reply.chunks:
        try:
            item = m.parse_chunk(chunk)
        except ProtocolViolation as exc:
            expect(False, f"{chunk.type.name} chunk", "a valid layout", str(exc))
        if isinstance(item, m.OffsetHole):
            expect(item.size > 0, "OFFSET_HOLE hole size", "nonzero", item.size)
        if chunk.type == ReplyType.NONE:
            expect(chunk.done, "NBD_REPLY_TYPE_NONE flags", "NBD_REPLY_FLAG_DONE", chunk.flags)


@spec(
    "Values / Transmission phase / Structured reply types",
    MUST,
    "Note that *message length* MUST NOT exceed the 4096 bytes string length limit.",
)
def test_read_error_chunk_is_well_formed(server):
    with structured(server) as (client, export, _):
        reply = client.read(export.size, 512)
    errors = [c for c in reply.chunks if c.type.is_error]
    expect(errors, "READ beyond the end", "an error chunk", [c.type.name for c in reply.chunks])
    for chunk in errors:
        try:
            item = m.parse_chunk(chunk)
        except ProtocolViolation as exc:
            expect(False, f"{chunk.type.name} chunk", "a valid layout", str(exc))
        assert isinstance(item, m.ChunkError)
        expect(item.error != Errno.OK, "error chunk error value", "nonzero", item.error)
        expect(
            len(item.message) <= STRING_MAX, "error message length", "<= 4096", len(item.message)
        )


@spec("Protocol phases / Transmission / Structured reply chunk message", MUST)
def test_structured_reply_echoes_cookie(server):
    """ "S: 64 bits, cookie": every chunk carries the cookie of its request."""
    cookie = 0x0123456789ABCDEF
    with structured(server) as (client, _, _):
        client.send_request(Cmd.READ, 0, 2 * BLOCK, cookie=cookie)
        while True:
            msg = client.recv_message()
            expect_equal(hex(msg.cookie), hex(cookie), "cookie of a reply chunk")
            if isinstance(msg, m.SimpleReply) or msg.done:
                break


# ---------------------------------------------------------------------- DF


def _df_reply(server, length: int):
    with structured(server, write=True) as (client, export, _):
        if not export.flags & TransmissionFlag.SEND_DF:
            unsupported("the server does not advertise NBD_FLAG_SEND_DF")
        return client.read(0, length, CmdFlag.DF)


DF_RULE = (
    "If this flag is set, the server MUST send at most one content chunk, although it MAY still "
    "send multiple chunks (the remaining chunks would be error chunks or a final type of "
    "`NBD_REPLY_TYPE_NONE`)."
)


@spec("Values / Transmission phase / Request types", MUST, DF_RULE)
@pytest.mark.writes
def test_df_read_has_one_content_chunk(server):
    reply = _df_reply(server, SPAN)
    kinds = [c.type.name for c in reply.chunks]
    content = [k for k in kinds if k in ("OFFSET_DATA", "OFFSET_HOLE")]
    expect(len(content) <= 1, "content chunks with NBD_CMD_FLAG_DF", "at most one", kinds)


@spec(
    "Values / Transmission phase / Request types",
    MUST,
    "If the area being read contains both data and a hole, the server MUST use "
    "`NBD_REPLY_TYPE_OFFSET_DATA` with the zeroes explicitly present.",
)
@pytest.mark.writes
def test_df_read_of_data_and_holes_is_offset_data(server):
    reply = _df_reply(server, SPAN)
    if reply.error == Errno.EOVERFLOW:
        unsupported("the server refused the 64 KiB DF read with EOVERFLOW (checked elsewhere)")
    kinds = [c.type.name for c in reply.chunks if not c.type.is_error]
    expect(
        "OFFSET_DATA" in kinds and "OFFSET_HOLE" not in kinds,
        "DF read of data and holes",
        "one OFFSET_DATA chunk",
        kinds,
    )
    expect_data(reply.data(0, SPAN), _expected_span(), "DF read contents")


@spec(
    "Values / Transmission phase / Request types",
    MUST,
    "A server MAY reject a client's request with the error `NBD_EOVERFLOW` if the length is too "
    "large to send without fragmentation, in which case it MUST NOT send a content chunk; "
    "however, the server MUST support unfragmented reads in which the client's request length "
    "does not exceed 65,536 bytes.",
)
@pytest.mark.writes
def test_df_read_of_64k_succeeds(server):
    reply = _df_reply(server, 65536)
    expect_equal(reply.error, Errno.OK, "error of a 65536-byte DF read")


# ------------------------------------------------------------- block status


def _status(server, length: int | None = None, flags: int = 0, *, write: bool = True):
    with structured(server, meta=True, write=write) as (client, export, context_id):
        reply = client.block_status(0, length or export.size, flags)
        return reply, context_id, length or export.size


@spec(
    "Values / Transmission phase / Structured reply types",
    MUST,
    "A successful block status request MUST have exactly one status chunk per negotiated "
    "metadata context ID.",
)
def test_block_status_one_chunk_per_context(server):
    reply, _, _ = _status(server, write=False)
    expect_equal(reply.error, Errno.OK, "BLOCK_STATUS error")
    kinds = [c.type.name for c in reply.chunks if c.type == ReplyType.BLOCK_STATUS]
    expect_equal(len(kinds), 1, "NBD_REPLY_TYPE_BLOCK_STATUS chunks for one context")


@spec("Values / Transmission phase / Request types", MUST)
def test_block_status_context_id_is_the_negotiated_one(server):
    """The chunk's "32 bits, metadata context ID" is the id NBD_OPT_SET_META_CONTEXT gave."""
    reply, context_id, _ = _status(server, write=False)
    ids = [b.context_id for b in reply.block_status]
    expect_equal(ids, [context_id], "metadata context IDs in the reply")


@spec("Values / Transmission phase / Structured reply types", MUST)
@pytest.mark.writes
def test_block_status_extent_lengths_are_nonzero(server):
    """ "32 bits, length of the extent to which the status below applies (unsigned, MUST be
    nonzero)"."""
    reply, _, _ = _status(server)
    for status in reply.block_status:
        lengths = [length for length, _ in status.extents]
        expect(all(lengths), "extent lengths", "all nonzero", lengths[:20])


@spec(
    "Values / Transmission phase / Structured reply types",
    MUST,
    "If the client did not use the flag, and the server replies with N extents, then the sum of "
    "the *length* fields of the first N-1 extents (if any) MUST be less than the requested "
    "length, while the *length* of the final extent MAY result in a sum larger than the original "
    "requested length, if the server has that information anyway as a side effect of reporting "
    "the status of the requested region.",
)
@pytest.mark.writes
def test_block_status_extents_stay_within_request(server):
    reply, _, length = _status(server, SPAN - BLOCK // 2)
    for status in reply.block_status:
        before_last = sum(extent for extent, _ in status.extents[:-1])
        expect(before_last < length, "sum of all extents but the last", f"< {length}", before_last)


@spec(
    "Values / Transmission phase / Structured reply types",
    MUST,
    "If the client used the `NBD_CMD_FLAG_REQ_ONE` flag in the request, then every reply chunk "
    "MUST contain exactly one descriptor, and that descriptor MUST NOT exceed the *length* of the "
    "original request.",
)
@pytest.mark.writes
def test_block_status_req_one_gives_one_extent(server):
    reply, _, length = _status(server, 2 * BLOCK + 512, CmdFlag.REQ_ONE)
    for status in reply.block_status:
        expect_equal(len(status.extents), 1, "descriptors with NBD_CMD_FLAG_REQ_ONE")
        expect(
            status.extents[0][0] <= length,
            "descriptor length",
            f"<= {length}",
            status.extents[0][0],
        )


@spec(
    "Metadata querying / The `base:` metadata namespace / `base:allocation` metadata context",
    MUST,
    "- `NBD_STATE_ZERO` (bit 1): if set, the block contents read as all zeroes; if clear, the "
    "block contents are not known.",
)
@pytest.mark.writes
def test_block_status_does_not_call_written_data_zero(server):
    reply, _, _ = _status(server, SPAN)
    for status in reply.block_status:
        position = 0
        for length, flags in status.extents:
            for block in PATTERN:
                if position < (block + 1) * BLOCK and block * BLOCK < position + length:
                    expect(
                        not flags & AllocationState.ZERO,
                        f"status of written block {block}",
                        "NBD_STATE_ZERO clear",
                        f"flags {flags:#x}",
                    )
            position += length


@spec(
    "Metadata querying",
    SHOULD,
    "Servers SHOULD reply with `NBD_EINVAL` to clients sending `NBD_CMD_BLOCK_STATUS` without "
    "selecting at least one metadata context.",
)
def test_block_status_without_context_gets_einval(server):
    with structured(server) as (client, _, _):
        reply = client.block_status(0, BLOCK)
        expect_equal(reply.error.name, "EINVAL", "BLOCK_STATUS without a metadata context")
    s.assert_still_serving(server, "NBD_CMD_BLOCK_STATUS without a metadata context")


@spec(
    "Metadata querying",
    SHOULD,
    "Servers SHOULD reply with `NBD_EINVAL` to clients sending `NBD_CMD_BLOCK_STATUS` without "
    "selecting at least one metadata context.",
)
def test_block_status_after_a_failed_set_meta_context_gets_einval(server):
    """SET_META_CONTEXT selects base:allocation, then a second SET_META_CONTEXT fails (it names
    no export).  "Issuing this command replaces all previously-set metadata contexts (including
    when this command fails)" (NBD_OPT_SET_META_CONTEXT): after GO no context is selected, and
    BLOCK_STATUS is refused.  A server that keeps the first selection answers with a status."""
    client = s.negotiated(server)
    try:
        if client.structured_reply().type == Rep.ERR_UNSUP:
            unsupported("the server does not support NBD_OPT_STRUCTURED_REPLY")
        name = s.export_name(server)
        query = (BASE_ALLOCATION.encode(),)
        if BASE_ALLOCATION not in client.set_meta_context(name, query).contexts:
            unsupported("the server does not offer base:allocation")
        failed = client.set_meta_context(b"conformance-no-such-export-7f3a", query)
        if failed.ok:
            unsupported("the server selects contexts for an export it does not have")
        expect_equal(client.go(name).type.name, "ACK", "reply to NBD_OPT_GO")
        reply = client.block_status(0, BLOCK)
        expect_equal(reply.error.name, "EINVAL", "BLOCK_STATUS after a failed SET_META_CONTEXT")
    finally:
        client.close()
