"""NBD_CMD_READ: data round trips, simple and structured replies, DF, out-of-order replies."""

from __future__ import annotations

import nbd
import pytest

from conformance.data import pattern
from conformance.handle import wait_all
from conformance.servers import ServerConfig
from conformance.spec import MUST, expect, expect_data, expect_equal, spec, unsupported

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
