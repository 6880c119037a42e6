"""NBD_CMD_WRITE: what is acknowledged is there, next to what was there before."""

from __future__ import annotations

import nbd
import pytest

from conformance.data import pattern
from conformance.handle import wait_all
from conformance.spec import (
    MUST,
    SHOULD,
    expect_data,
    expect_equal,
    expect_success,
    spec,
    unsupported,
)

REQUESTS = "Values / Transmission phase / Request types"
WRITE_RULE = "The server MUST write the data to disk, and then send the reply message."
DEFAULT_SIZES = (
    "If size constraints have not been advertised or agreed on externally, then a server "
    "SHOULD support a default minimum block size of 1, a preferred block size of 2^12 "
    "(4,096), and a maximum payload size that is at least 2^25 (33,554,432) (even if the "
    "export size is smaller);"
)

pytestmark = pytest.mark.writes


@spec(REQUESTS, MUST, quote=WRITE_RULE)
def test_later_write_wins_where_writes_overlap(server):
    h = server.connect()
    h.pwrite(pattern(0, 16384, tag=1), 0)
    h.pwrite(pattern(4096, 4096, tag=2), 4096)
    expected = pattern(0, 4096, tag=1) + pattern(4096, 4096, tag=2) + pattern(8192, 8192, tag=1)
    expect_data(h.pread(16384, 0), expected, "overlapping writes")


@pytest.mark.parametrize("offset,length", [(4097, 3), (8191, 2), (1000, 7000), (4096, 1)])
@spec(REQUESTS, MUST, quote=WRITE_RULE)
def test_small_unaligned_write_keeps_its_neighbours(server, offset, length):
    """A read-modify-write inside the server must not disturb the bytes around the write."""
    h = server.connect()
    minimum = h.get_block_size(nbd.SIZE_MINIMUM) or 1
    if offset % minimum or length % minimum:
        unsupported(f"the server's minimum block size is {minimum}")
    h.pwrite(pattern(0, 16384, tag=1), 0)
    h.pwrite(pattern(offset, length, tag=2), offset)
    expected = bytearray(pattern(0, 16384, tag=1))
    expected[offset : offset + length] = pattern(offset, length, tag=2)
    expect_data(h.pread(16384, 0), expected, f"16 KiB around a {length}-byte write at {offset}")


@spec(REQUESTS, MUST, quote=WRITE_RULE)
def test_write_of_maximum_payload(server):
    """A write as large as the advertised maximum payload (32 MiB by default) lands whole."""
    h = server.connect()
    maximum = h.get_block_size(nbd.SIZE_MAXIMUM) or (32 << 20)
    length = min(maximum, 32 << 20, h.get_size())
    length -= length % (h.get_block_size(nbd.SIZE_MINIMUM) or 1)
    data = pattern(0, length, tag=4)
    h.pwrite(data, 0)
    expect_data(h.pread(length, 0), data, f"{length}-byte write")


def _connect_without_sizes(server):
    """A libnbd client that does not ask for block sizes (strict mode off: the server judges
    the requests).  A server that insists on being asked (NBD_REP_ERR_BLOCK_SIZE_REQD, which
    it MAY answer) has no defaults to check: UNSUPPORTED."""
    try:
        return server.connect(request_block_size=False, strict=0)
    except nbd.Error as err:
        if "block size" in str(err):
            unsupported(f"the server insists that clients ask for block sizes ({err})")
        raise


@spec("Size constraints", SHOULD, quote=DEFAULT_SIZES)
def test_default_maximum_payload_without_block_size_request(server):
    """A client that did not ask for sizes may still write 32 MiB (or the whole export)."""
    h = _connect_without_sizes(server)
    length = min(32 << 20, h.get_size())
    data = pattern(0, length, tag=6)
    h.pwrite(data, 0)
    expect_data(h.pread(length, 0), data, f"{length}-byte write without NBD_INFO_BLOCK_SIZE")


@spec("Size constraints", SHOULD, quote=DEFAULT_SIZES)
def test_default_minimum_and_preferred_block_sizes_without_block_size_request(server):
    """A client that did not ask for sizes (and so agreed on none): a 1-byte write at an odd
    offset, 3 bytes across a 4 KiB boundary, a 1-byte read, and a 4 KiB write and read at a
    4 KiB boundary all succeed and read back.  libnbd's strict mode is off so that the
    server, not libnbd, judges the alignment; the 2^25 payload is the check above."""
    h = _connect_without_sizes(server)
    base = 1 << 20
    before = pattern(base, 3 * 4096, tag=9)
    h.pwrite(before, base)
    expected = bytearray(before)
    writes = (
        (1, b"\x01", "a 1-byte write at an odd offset"),
        (4095, b"\x02\x03\x04", "3 bytes written across a 4 KiB boundary"),
        (8192, pattern(0, 4096, tag=10), "a 4 KiB write at a 4 KiB boundary"),
    )
    for offset, data, what in writes:
        expect_success(lambda: h.pwrite(data, base + offset), what)  # noqa: B023
        expected[offset : offset + len(data)] = data
    one = expect_success(lambda: h.pread(1, base + 1), "a 1-byte read at an odd offset")
    expect_data(one, b"\x01", "a 1-byte read at an odd offset")
    block = expect_success(lambda: h.pread(4096, base + 8192), "a 4 KiB read at 4 KiB")
    expect_data(block, expected[8192:], "a 4 KiB read at a 4 KiB boundary")
    expect_data(h.pread(3 * 4096, base), bytes(expected), "unaligned writes without block sizes")


@spec(
    "Protocol phases / Transmission",
    MUST,
    quote="Replies need not be sent in the same order "
    "as requests (i.e., requests may be handled by the server asynchronously), and "
    "structured reply chunks from one request may be interleaved with reply messages from "
    "other requests; however, there may be constraints that prevent arbitrary reordering of "
    "structured reply chunks within a given reply.",
)
def test_many_writes_in_flight_all_land(server):
    """64 writes of 12 KiB (unaligned to 4 KiB) in flight at once, scattered: all acknowledged."""
    h = server.connect()
    length = 12288 + 512
    count = 64
    order = [(i * 29) % count for i in range(count)]
    cookies = [h.aio_pwrite(pattern(i * length, length, tag=8), i * length) for i in order]
    errors = wait_all(h, cookies, what="64 writes in flight")
    expect_equal([e for e in errors if e is not None], [], "errors of the writes in flight")
    expect_data(
        h.pread(count * length, 0), pattern(0, count * length, tag=8), "data of the 64 writes"
    )


@spec(
    REQUESTS,
    MUST,
    quote="The server MUST write the data to disk, and then send the reply message.",
)
def test_flushed_write_survives_disconnect(server):
    """Written and flushed on one connection, then read on a new one after the first left.

    Visibility, not durability: "permanent storage" (the FLUSH sentence) cannot be seen from
    the wire, so this checks the written data reads back once its connection is gone."""
    h = server.connect()
    if not h.can_flush():
        unsupported("the server does not advertise NBD_FLAG_SEND_FLUSH")
    data = pattern(3 << 20, 65536, tag=12)
    h.pwrite(data, 3 << 20)
    h.flush()
    h.shutdown()
    expect_data(server.connect().pread(65536, 3 << 20), data, "read after reconnecting")
