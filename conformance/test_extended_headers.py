"""EXTENDED_HEADERS (experimental extension, proto-extension-ext-header.md), where offered.

proto.md only reserves the numbers; the requirements quoted in the docstrings
come from the extension document.  A server that answers
NBD_OPT_EXTENDED_HEADERS with NBD_REP_ERR_UNSUP gets the verdict UNSUPPORTED.
"""

from __future__ import annotations

import contextlib
import struct

import pytest

from conformance.servers import ServerConfig
from conformance.spec import MUST, SHOULD, expect, expect_data, expect_equal, spec, unsupported
from conformance.wire import (
    BASE_ALLOCATION,
    Cmd,
    CmdFlag,
    Disconnected,
    Errno,
    Opt,
    Rep,
    ReplyType,
    TransmissionFlag,
)
from conformance.wire import messages as m
from conformance.wire import session as s
from conformance.wire.constants import EXTENDED_REPLY_MAGIC

BLOCK = 4096
DATA = bytes(range(256)) * 16


def _require_extended(client) -> None:
    result = client.extended_headers()
    if result.type == Rep.ERR_UNSUP:
        unsupported("the server does not support NBD_OPT_EXTENDED_HEADERS")
    expect_equal(result.type.name, "ACK", "reply to NBD_OPT_EXTENDED_HEADERS")


@contextlib.contextmanager
def extended(server, *, meta: bool = False, structured_too: bool = False):
    """A transmission-phase client with extended headers (and base:allocation)."""
    client = s.negotiated(server)
    try:
        _require_extended(client)
        if structured_too:
            client.structured_reply()
        name = s.export_name(server)
        context_id = None
        if meta:
            selected = client.set_meta_context(name, (BASE_ALLOCATION.encode(),))
            expect_equal(selected.type.name, "ACK", "SET_META_CONTEXT with extended headers only")
            if BASE_ALLOCATION not in selected.contexts:
                unsupported("the server does not offer base:allocation")
            context_id = selected.contexts[BASE_ALLOCATION]
        go = client.go(name)
        expect_equal(go.type.name, "ACK", "NBD_OPT_GO after NBD_OPT_EXTENDED_HEADERS")
        yield client, go.export, context_id
    finally:
        client.close()


@spec("Values / Handshake phase / Flag fields / Transmission flags", MUST)
def test_block_status_payload_flag_clear_without_extended_headers(server):
    """NBD_FLAG_BLOCK_STATUS_PAYLOAD (bit 12): "Servers MUST NOT advertise this bit unless the
    client successfully negotiates extended headers via `NBD_OPT_EXTENDED_HEADERS`"."""
    client, export = s.transmission(server)
    try:
        flags = export.flags
        expect(
            not flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD,
            "NBD_FLAG_BLOCK_STATUS_PAYLOAD",
            "clear",
            repr(flags),
        )
    finally:
        client.disconnect()


@spec("Values / Handshake phase / Option types", SHOULD)
def test_extended_headers_with_data_gets_err_invalid(server):
    """ "The client MUST NOT send any additional data with the option, and the server SHOULD
    reject a request that includes data with `NBD_REP_ERR_INVALID`." """
    client = s.negotiated(server)
    try:
        result = client.option(Opt.EXTENDED_HEADERS, b"junk")
        if result.type == Rep.ERR_UNSUP:
            unsupported("the server does not support NBD_OPT_EXTENDED_HEADERS")
        expect_equal(result.type.name, "ERR_INVALID", "NBD_OPT_EXTENDED_HEADERS with data")
    finally:
        client.close()


def _request(client, case: str, export):
    if case == "write":
        return client.write(BLOCK, DATA), BLOCK
    if case == "flush":
        if not export.flags & TransmissionFlag.SEND_FLUSH:
            unsupported("the server does not advertise NBD_FLAG_SEND_FLUSH")
        return client.request(Cmd.FLUSH), 0
    if case == "read-out-of-bounds":
        return client.read(export.size, 512), export.size
    return client.read(BLOCK, 512), BLOCK


CASES = ["read", "write", "flush", "read-out-of-bounds"]


@spec("Protocol phases / Transmission", MUST)
@pytest.mark.writes
@pytest.mark.parametrize("case", CASES)
def test_every_reply_is_extended(server, case):
    """ "If extended headers are negotiated, all server replies MUST use an extended reply; the
    server MUST NOT use simple replies even when there is no payload." """
    with extended(server) as (client, export, _):
        reply, _ = _request(client, case, export)
        magics = [hex(getattr(msg, "magic", 0)) for msg in reply.messages]
        expect(
            all(isinstance(x, m.Chunk) and x.extended for x in reply.messages),
            f"reply to {case}",
            f"extended replies ({EXTENDED_REPLY_MAGIC:#x})",
            magics,
        )


@spec("Protocol phases / Transmission", MUST)
@pytest.mark.writes
@pytest.mark.parametrize("case", CASES)
def test_extended_reply_offset_matches_request(server, case):
    """ "The extended reply has an additional field *offset* which MUST match the *offset* of the
    client's request"."""
    with extended(server) as (client, export, _):
        reply, offset = _request(client, case, export)
        for chunk in reply.chunks:
            expect_equal(chunk.offset, offset, f"offset field of a {chunk.type.name} reply")


@spec("Protocol phases / Transmission", MUST)
@pytest.mark.writes
def test_extended_write_then_read(server):
    """NBD_CMD_WRITE with NBD_CMD_FLAG_PAYLOAD_LEN, then NBD_CMD_READ, both with 32-byte headers."""
    with extended(server) as (client, _, _):
        expect_equal(client.write(BLOCK, DATA).error, Errno.OK, "extended WRITE")
        reply = client.read(BLOCK, len(DATA))
        expect_equal(reply.error, Errno.OK, "extended READ")
        expect_data(reply.data(BLOCK, len(DATA)), DATA, "data read back")


@spec(
    "Values / Transmission phase / Request types",
    MUST,
    quote="The server MUST write the data to disk, and then send the reply message.",
)
@pytest.mark.writes
def test_extended_write_above_4_gib_lands_there(start_server):
    """32-byte headers carry 64-bit offsets: a WRITE at 4 GiB + 4 KiB lands there, not at 4 KiB.

    The two offsets are equal modulo 2^32, so a server that keeps the offset of an extended
    request in 32 bits overwrites the data below 4 GiB (and reads it back from there).
    """
    server = start_server(ServerConfig(size=8 << 30))
    low, high = DATA, bytes(reversed(DATA))
    above = (4 << 30) + BLOCK
    with extended(server) as (client, _, _):
        expect_equal(client.write(BLOCK, low).error, Errno.OK, f"extended WRITE at {BLOCK}")
        expect_equal(client.write(above, high).error, Errno.OK, f"extended WRITE at {above}")
        for offset, data in ((BLOCK, low), (above, high)):
            reply = client.read(offset, len(data))
            expect_equal(reply.error, Errno.OK, f"extended READ at {offset}")
            expect_data(reply.data(offset, len(data)), data, f"data read back at {offset}")


@spec("Values / Handshake phase / Option types", MUST)
def test_set_meta_context_accepted_with_extended_headers_only(server):
    """ "This option MUST NOT be requested unless structured replies or extended headers have
    been negotiated first": extended headers alone are enough."""
    with extended(server, meta=True) as (_, _, context_id):
        expect(context_id is not None, "base:allocation selected", True, context_id)


@spec("Values / Transmission phase / Structured reply types", MUST)
def test_block_status_uses_block_status_ext(server):
    """ "only `NBD_REPLY_TYPE_BLOCK_STATUS` for structured replies, and only
    `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` for extended headers"; "*length* MUST be 8 + (a positive
    multiple of 16)" with a matching descriptor count."""
    with extended(server, meta=True) as (client, export, context_id):
        reply = client.block_status(0, export.size)
        kinds = [c.type.name for c in reply.chunks]
        expect_equal(kinds.count("BLOCK_STATUS_EXT"), 1, f"status chunks ({kinds})")
        expect("BLOCK_STATUS" not in kinds, "status chunk types", "no BLOCK_STATUS", kinds)
        for chunk in reply.chunks:
            if chunk.type == ReplyType.BLOCK_STATUS_EXT:
                status = m.parse_chunk(chunk)
                assert isinstance(status, m.BlockStatus)
                expect_equal(status.context_id, context_id, "metadata context ID")


@spec("Values / Transmission phase / Structured reply types", MUST)
def test_block_status_ext_base_status_fits_32_bits(server):
    """ "For metadata contexts that only return a 32-bit status (including all contexts in the
    "base:" namespace), the most-significant 32 bits of *status* MUST be all zeroes." """
    with extended(server, meta=True) as (client, export, _):
        reply = client.block_status(0, export.size)
        for status in reply.block_status:
            high = [flags >> 32 for _, flags in status.extents if flags >> 32]
            expect_equal(high, [], "high 32 bits of base:allocation status values")


@spec("Values / Handshake phase / Option types", MUST)
@pytest.mark.writes
def test_extended_headers_take_precedence_over_structured_replies(server):
    """ "When successful, this option takes precedence over structured replies": STRUCTURED_REPLY
    asked after EXTENDED_HEADERS (whatever its answer) leaves replies extended."""
    with extended(server, structured_too=True) as (client, _, _):
        reply = client.read(0, BLOCK)
        expect(
            all(isinstance(x, m.Chunk) and x.extended for x in reply.messages),
            "READ reply",
            "extended replies",
            reply.messages,
        )


@spec("Protocol phases / Transmission", SHOULD)
def test_unexpected_payload_is_consumed(server):
    """ "a server SHOULD gracefully consume *length* bytes of payload (even if it then replies
    with an `NBD_EINVAL` failure because the particular command was not expecting a payload),
    and proceed with the next client command"."""
    with extended(server) as (client, _, _):
        client.request(Cmd.READ, 0, 16, flags=CmdFlag.PAYLOAD_LEN, payload=b"\x99" * 16)
        reply = client.read(0, 512)
        expect_equal(reply.error, Errno.OK, "READ after a READ that carried a payload")


# ------------------------------------------------------- BLOCK_STATUS_EXT layout

EXT_TYPES = "Values / Transmission phase / Structured reply types"


def _ext_status_chunks(server, length: int | None = None):
    """The raw NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunks for a query of the whole export and of an
    unaligned piece, after writing a block of data (so there are several extents)."""
    with extended(server, meta=True) as (client, export, _):
        expect_equal(client.write(BLOCK, DATA).error, Errno.OK, "extended WRITE")
        chunks = []
        for offset, size in ((0, export.size), (BLOCK // 2, 3 * BLOCK + 100)):
            reply = client.block_status(offset, size)
            chunks += [c for c in reply.chunks if c.type == ReplyType.BLOCK_STATUS_EXT]
        expect(chunks, "NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunks", "at least one", chunks)
        return chunks


@spec(EXT_TYPES, MUST, "32 bits, metadata context ID 32 bits, descriptor count (MUST be nonzero)")
@pytest.mark.writes
def test_block_status_ext_descriptor_count_is_nonzero(server):
    for chunk in _ext_status_chunks(server):
        expect(len(chunk.payload) >= 8, "BLOCK_STATUS_EXT length", ">= 8", len(chunk.payload))
        count = struct.unpack_from(">I", chunk.payload, 4)[0]
        expect(count > 0, "BLOCK_STATUS_EXT descriptor count", "nonzero", count)
        expect_equal(len(chunk.payload), 8 + 16 * count, "BLOCK_STATUS_EXT length for its count")


@spec(
    EXT_TYPES,
    MUST,
    "64 bits, length of the extent to which the status below applies (unsigned, MUST be nonzero) "
    "64 bits, status flags",
)
@pytest.mark.writes
def test_block_status_ext_extent_lengths_are_nonzero(server):
    for chunk in _ext_status_chunks(server):
        status = m.parse_chunk(chunk)
        assert isinstance(status, m.BlockStatus)
        lengths = [length for length, _ in status.extents]
        expect(all(lengths), "BLOCK_STATUS_EXT extent lengths", "all nonzero", lengths[:20])


# ------------------------------------------------ the payload form of BLOCK_STATUS


@spec(
    "Values / Transmission phase / Request types",
    MUST,
    "If the server does not support the payload form, or detects duplicate or unknown "
    "metacontext ids in the client's payload, the server MUST gracefully consume the client's "
    "payload before failing with `NBD_EINVAL`.",
)
def test_block_status_payload_is_consumed_then_refused(server):
    """NBD_CMD_BLOCK_STATUS with NBD_CMD_FLAG_PAYLOAD_LEN naming an unknown id, then one id
    twice: NBD_EINVAL, and the next request on the connection is parsed and answered.  A server
    that does not support the payload form gets it too, and must answer the same way."""
    with extended(server, meta=True) as (client, _, context_id):
        assert context_id is not None
        for ids, chosen in (
            ("unknown", [context_id ^ 0x5A5A5A5A]),
            ("duplicate", [context_id, context_id]),
        ):
            payload = m.pack_block_status_payload(BLOCK, chosen)
            cookie = client.send_request(
                Cmd.BLOCK_STATUS, 0, len(payload), flags=CmdFlag.PAYLOAD_LEN, payload=payload
            )
            reply = client.reply(cookie)
            expect_equal(reply.error.name, "EINVAL", f"BLOCK_STATUS with a payload of {ids} ids")
            after = client.read(0, 512)
            expect_equal(after.error, Errno.OK, f"READ after a payload of {ids} ids")


@spec(
    "Values / Handshake phase / Flag fields / Transmission flags",
    SHOULD,
    "SHOULD NOT advertise this bit in response to `NBD_OPT_GO` if the client does not negotiate "
    "metacontexts with `NBD_OPT_SET_META_CONTEXT`",
)
def test_block_status_payload_flag_clear_without_meta_contexts(server):
    with extended(server) as (_, export, _):
        expect(
            not export.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD,
            "NBD_FLAG_BLOCK_STATUS_PAYLOAD without NBD_OPT_SET_META_CONTEXT",
            "clear",
            repr(export.flags),
        )


@spec(
    "Values / Handshake phase / Option types",
    SHOULD,
    "although a server SHOULD support this option even if structured replies are not negotiated.",
)
def test_extended_headers_without_structured_replies(server):
    """NBD_OPT_EXTENDED_HEADERS as the first option: a server that supports it at all (as shown
    after NBD_OPT_STRUCTURED_REPLY) accepts it there too."""
    client = s.negotiated(server)
    try:
        first = client.extended_headers()
    finally:
        client.close()
    if first.type == Rep.ACK:
        return
    client = s.negotiated(server)
    try:
        client.structured_reply()
        second = client.extended_headers()
    finally:
        client.close()
    if second.type != Rep.ACK:
        unsupported("the server does not support NBD_OPT_EXTENDED_HEADERS")
    expect_equal(
        first.type.name, "ACK", "NBD_OPT_EXTENDED_HEADERS without NBD_OPT_STRUCTURED_REPLY first"
    )


@spec(
    "Protocol phases / Transmission / Request message",
    SHOULD,
    "A server SHOULD initiate hard disconnect if a client sets the `NBD_CMD_FLAG_PAYLOAD_LEN` flag "
    "and uses a *length* larger than a server's advertised or default maximum payload length "
    "(capped at 32 bits by the constraints of `NBD_INFO_BLOCK_SIZE`)",
)
@pytest.mark.writes
@pytest.mark.disruptive
def test_payload_beyond_maximum_gets_hard_disconnect(server):
    """A WRITE announcing 4 GiB + 4 KiB with NBD_CMD_FLAG_PAYLOAD_LEN (beyond any maximum payload
    NBD_INFO_BLOCK_SIZE can advertise, and the default 32 MiB), of which 64 KiB is sent: the
    server disconnects rather than reading on."""
    with extended(server) as (client, _, _):
        length = (1 << 32) + 4096
        header = m.pack_extended_request(
            Cmd.WRITE, 0, length, flags=CmdFlag.PAYLOAD_LEN, cookie=0xFEDCBA9876543210
        )
        try:
            client.send(header + b"\x77" * 65536)
        except Disconnected:
            return
        outcome = client.expect_disconnect(5.0)
        expect(
            outcome.disconnected,
            f"connection after a WRITE announcing {length} bytes with NBD_CMD_FLAG_PAYLOAD_LEN",
            "a hard disconnect",
            f"still open after {outcome.waited:.1f}s ({len(outcome.data)} bytes received)",
        )
    s.assert_still_serving(server, "a WRITE payload beyond the maximum")
