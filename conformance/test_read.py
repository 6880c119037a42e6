"""NBD_CMD_READ: data round trips, simple and structured replies, DF, out-of-order replies."""

from __future__ import annotations

import struct
import time

import nbd
import pytest

from conformance.data import pattern
from conformance.handle import wait_all
from conformance.servers.base import ServerConfig
from conformance.spec import MUST, expect, expect_data, expect_equal, spec, unsupported
from conformance.wire import Cmd, Disconnected, Errno, ReplyFlag, ReplyType
from conformance.wire import session as s
from conformance.wire.constants import SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC

REQUESTS = "Values / Transmission phase / Request types"
TRANSMISSION = "Protocol phases / Transmission"
COVER = (
    "When no error is detected, the server MUST send enough data chunks to cover the "
    "entire region described by the offset and length of the client's request."
)
GiB = 1 << 30

# (offset, length) pairs: aligned, unaligned, crossing block boundaries, at the end.
RANGES = {
    "first-sector": (0, 512),
    "one-block": (4096, 4096),
    "one-byte": (12345, 1),
    "crossing-4k": (8190, 5),
    "unaligned-long": (65537, 70001),
    "1m": (1 << 20, 1 << 20),
    "last-block": (-4096, 4096),
    "last-byte": (-1, 1),
}


def _resolve(h, offset, length):
    size = h.get_size()
    return (size + offset if offset < 0 else offset), length


def _aligned_or_skip(h, offset, length):
    minimum = h.get_block_size(nbd.SIZE_MINIMUM) or 1
    if offset % minimum or length % minimum:
        unsupported(f"the server's minimum block size is {minimum}")


@pytest.mark.writes
@pytest.mark.parametrize("where", RANGES)
@spec(
    REQUESTS, MUST, quote="The server MUST write the data to disk, and then send the reply message."
)
def test_read_returns_what_was_written(server, where):
    h = server.connect()
    offset, length = _resolve(h, *RANGES[where])
    _aligned_or_skip(h, offset, length)
    data = pattern(offset, length, tag=7)
    h.pwrite(data, offset)
    expect_data(h.pread(length, offset), data, f"read of {length} bytes at {offset}")


@pytest.mark.writes
@spec(
    "Protocol phases / Transmission / Simple reply message",
    MUST,
    quote="The simple reply message MUST be sent by the server in response to all requests "
    "if structured replies have not been negotiated using `NBD_OPT_STRUCTURED_REPLY`.",
)
def test_read_with_simple_replies(server):
    h = server.connect(structured_replies=False)
    data = pattern(4096, 65536, tag=3)
    h.pwrite(data, 4096)
    expect_data(h.pread(65536, 4096), data, "read with simple replies")


class _Chunks:
    """Records the content chunks of a structured read."""

    def __init__(self):
        self.chunks = []

    def __call__(self, subbuf, offset, status, error):
        self.chunks.append((offset, len(subbuf), status, bytes(subbuf)))
        return 0


@pytest.mark.writes
@spec(REQUESTS, MUST, quote=COVER)
def test_structured_read_chunks_cover_the_request_exactly_once(server):
    h = server.connect()
    if not h.get_structured_replies_negotiated():
        unsupported("structured replies are not negotiated")
    # Data, then a never-written gap (possibly a hole), then data again.
    h.pwrite(pattern(0, 8192, tag=5), 0)
    h.pwrite(pattern(1 << 20, 8192, tag=5), 1 << 20)
    length = (1 << 20) + 8192
    chunks = _Chunks()
    buf = h.pread_structured(length, 0, chunks)
    covered = bytearray(length)
    for offset, size, _, _ in chunks.chunks:
        expect(
            offset >= 0 and offset + size <= length,
            "chunk inside the request",
            expected=f"within [0, {length})",
            actual=f"[{offset}, {offset + size})",
        )
        expect(size > 0, "content chunk describes at least one byte", actual=size)
        expect(
            not any(covered[offset : offset + size]),
            "content chunks do not overlap",
            expected="no overlap",
            actual=f"chunk [{offset}, {offset + size}) overlaps",
        )
        covered[offset : offset + size] = b"\1" * size
    expect(
        all(covered),
        "content chunks cover the request",
        expected="every byte",
        actual=f"{covered.count(0)} bytes uncovered",
    )
    expect_data(buf[:8192], pattern(0, 8192, tag=5), "data before the gap")
    expect_data(buf[1 << 20 :], pattern(1 << 20, 8192, tag=5), "data after the gap")


@pytest.mark.writes
@spec(REQUESTS, MUST, quote=COVER)
def test_read_above_4_gib_covers_its_own_range(start_server):
    """Offsets are 64 bits: a read above 4 GiB is answered with the chunks of its own range.

    On an 8 GiB export, data at 64 KiB and at 4 GiB + 64 KiB (equal modulo 2^32), then a
    read of 4 GiB + [0, 192 KiB): hole or zeroes, data, hole or zeroes.  A server that keeps
    an offset in 32 bits sends chunks for the range below 4 GiB (libnbd refuses a chunk
    outside the request) or the data found there.
    """
    server = start_server(ServerConfig(size=8 * GiB))
    h = server.connect()
    block, base = 65536, 4 * GiB
    low, high = pattern(block, block, tag=12), pattern(base + block, block, tag=13)
    h.pwrite(low, block)
    h.pwrite(high, base + block)
    expect_data(
        h.pread(3 * block, base),
        bytes(block) + high + bytes(block),
        f"read of {3 * block} bytes at 4 GiB (data written at 4 GiB + {block})",
    )
    expect_data(h.pread(block, block), low, f"data at {block}, below 4 GiB")


@pytest.mark.writes
@pytest.mark.parametrize("length", [4096, 65536])
@spec(
    REQUESTS,
    MUST,
    quote="If this flag is set, the server MUST send at most one content "
    "chunk, although it MAY still send multiple chunks (the remaining chunks would be error "
    "chunks or a final type of `NBD_REPLY_TYPE_NONE`).",
)
def test_df_read_is_one_data_chunk(server, length):
    """DF: one content chunk, and OFFSET_DATA (zeroes explicit) when data and hole mix."""
    h = server.connect()
    if not h.can_df():
        unsupported("the server does not advertise NBD_FLAG_SEND_DF")
    offset = 2 << 20
    h.pwrite(pattern(offset, 512, tag=9), offset)  # the rest of the range stays unwritten
    chunks = _Chunks()
    buf = h.pread_structured(length, offset, chunks, flags=nbd.CMD_FLAG_DF)
    expect_equal(len(chunks.chunks), 1, f"content chunks in a DF read of {length} bytes")
    expect_equal(
        chunks.chunks[0][2],
        nbd.READ_DATA,
        "chunk type of a DF read mixing data and hole (1 = OFFSET_DATA)",
    )
    expect_data(buf[:512], pattern(offset, 512, tag=9), "DF read data")


@pytest.mark.writes
@spec(
    TRANSMISSION,
    MUST,
    quote="In each reply message (whether simple or structured), the "
    "server MUST use the same value for cookie as was sent by the client in the "
    "corresponding request, treating the cookie as an opaque field.",
)
def test_many_reads_in_flight_get_their_own_data(server):
    """64 reads in flight at once: each reply carries the cookie, and the data, of its request."""
    h = server.connect()
    block = 4096
    count = 64
    h.pwrite(pattern(0, block * count, tag=11), 0)
    buffers = [nbd.Buffer(block) for _ in range(count)]
    # Scatter the offsets so that a server answering in order of offset reorders replies.
    order = [(i * 37) % count for i in range(count)]
    cookies = [h.aio_pread(buffers[i], i * block) for i in order]
    errors = wait_all(h, cookies, what="64 reads in flight")
    expect_equal([e for e in errors if e is not None], [], "errors of the reads in flight")
    for i in order:
        expect_data(
            buffers[i].to_bytearray(),
            pattern(i * block, block, tag=11),
            f"read in flight at offset {i * block}",
        )


# ------------------------------------------------------------- a read above 4 GiB

#: The largest 32-bit read length: more than 2^32 - 8 bytes, so that one
#: NBD_REPLY_TYPE_OFFSET_DATA chunk (8 bytes of offset plus the data) cannot hold it.
HUGE_READ = 0xFFFFFFFF
HUGE_EXPORT = HUGE_READ + (1 << 20)
# A server streaming 4 GiB through a raw socket, discarded as it comes, takes
# seconds; this bounds a server that trickles.
HUGE_READ_DEADLINE = 120.0


@spec(
    REQUESTS,
    MUST,
    quote="a request for more than 2^32 - 8 bytes containing data rather than holes MUST be "
    "split to avoid overflowing the 32-bit `NBD_REPLY_TYPE_OFFSET_DATA` length field",
)
def test_read_above_4_gib_is_split_into_chunks_or_refused(start_server):
    """A READ of 2^32 - 1 bytes with structured replies (32-bit headers) on a sparse export
    of 4 GiB + 1 MiB: the server refuses it up front (permitted: the check is then
    unsupported) or answers with chunks whose framing holds and which tile the request.
    The payload is read into a 1 MiB buffer and discarded, so the suite's memory stays
    bounded; a server whose chunk length wrapped around 2^32 loses the framing."""
    server = start_server(ServerConfig(size=HUGE_EXPORT, read_only=True))
    client = s.negotiated(server)
    try:
        if not client.structured_reply().ok:
            unsupported("structured replies are not negotiated: no chunk length to overflow")
        go = client.go(s.export_name(server))
        expect_equal(go.type.name, "ACK", "NBD_OPT_GO")
        size = go.export.size if go.export else 0
        expect(size >= HUGE_READ, "export size", f">= {HUGE_READ}", size)
        cookie = client.send_request(Cmd.READ, 0, HUGE_READ)
        pieces, refusal = _stream_huge_read(client, cookie)
    finally:
        client.close()
    if refusal is not None:
        unsupported(f"the server refuses a read of {HUGE_READ} bytes: {refusal}")
    end = 0
    for offset, size in sorted(pieces):
        expect(offset >= end, "chunks of the 4 GiB read do not overlap", True, (offset, end))
        end = offset + size
    expect(end <= HUGE_READ, "chunks inside the request", f"<= {HUGE_READ}", end)
    covered = sum(size for _, size in pieces)
    expect_equal(covered, HUGE_READ, "bytes described by the chunks of the 4 GiB read")


def _stream_huge_read(client, cookie: int) -> tuple[list[tuple[int, int]], str | None]:
    """((offset, size) of each data or hole chunk, None), or ([], why the read was refused)."""
    sock, sink = client.sock, memoryview(bytearray(1 << 20))
    deadline = time.monotonic() + HUGE_READ_DEADLINE
    pieces: list[tuple[int, int]] = []
    while True:
        (magic,) = struct.unpack(">I", client.recv_exactly(4, "reply magic"))
        if magic == SIMPLE_REPLY_MAGIC:
            error, got = struct.unpack(">IQ", client.recv_exactly(12, "simple reply"))
            expect(error != 0, "a simple reply to a structured read", "an error", "success")
            return [], f"simple reply {Errno(error).name}"
        expect_equal(hex(magic), hex(STRUCTURED_REPLY_MAGIC), "reply magic (framing lost?)")
        flags, kind, got, length = struct.unpack(">HHQI", client.recv_exactly(16, "chunk"))
        expect_equal(got, cookie, "chunk cookie (framing lost?)")
        if kind == ReplyType.OFFSET_DATA:
            expect(length >= 9, "OFFSET_DATA length", ">= 9", length)
            (offset,) = struct.unpack(">Q", client.recv_exactly(8, "chunk offset"))
            left = length - 8
            while left:
                if time.monotonic() > deadline:
                    unsupported(f"the server took over {HUGE_READ_DEADLINE:.0f}s to send 4 GiB")
                n = sock.recv_into(sink, min(left, len(sink)))
                if not n:
                    raise Disconnected("the server closed the connection inside a data chunk")
                left -= n
            pieces.append((offset, length - 8))
        elif kind == ReplyType.OFFSET_HOLE:
            expect_equal(length, 12, "OFFSET_HOLE length")
            pieces.append(struct.unpack(">QI", client.recv_exactly(12, "hole chunk")))
        else:
            payload = client.recv_exactly(length, "chunk payload")
            if kind & 0x8000:
                (error,) = struct.unpack_from(">I", payload)
                return [], f"{ReplyType(kind).name} {Errno(error).name}"
            expect(kind == ReplyType.NONE, "chunk type of a read", "data, hole or none", kind)
        if flags & ReplyFlag.DONE:
            return pieces, None
