"""NBD_CMD_BLOCK_STATUS with the base:allocation context."""

from __future__ import annotations

import errno

import nbd
import pytest

from conformance.data import pattern
from conformance.servers import ServerConfig
from conformance.spec import (
    MUST,
    SHOULD,
    expect,
    expect_equal,
    expect_nbd_error,
    expect_zero,
    spec,
    unsupported,
)

REQUESTS = "Values / Transmission phase / Request types"
ALLOCATION = (
    "Metadata querying / The `base:` metadata namespace / `base:allocation` metadata context"
)
CONTEXT = nbd.CONTEXT_BASE_ALLOCATION


class _Replies:
    """Records the block status chunks libnbd hands over, per context."""

    def __init__(self):
        self.chunks = []

    def __call__(self, context, offset, entries, err):
        self.chunks.append((context, offset, list(entries)))
        return 0

    def extents(self):
        """[(offset, length, flags)] of the single base:allocation chunk."""
        found = [c for c in self.chunks if c[0] == CONTEXT]
        expect_equal(len(found), 1, "NBD_REPLY_TYPE_BLOCK_STATUS chunks for base:allocation")
        _, offset, entries = found[0]
        expect(
            len(entries) >= 2 and len(entries) % 2 == 0,
            "at least one status descriptor",
            expected=">= 1 descriptor",
            actual=f"{len(entries) // 2} descriptors",
        )
        result = []
        for length, flags in zip(entries[::2], entries[1::2], strict=True):
            result.append((offset, length, flags))
            offset += length
        return result


def _connect(server, **opts):
    h = server.connect(meta_contexts=[CONTEXT], **opts)
    if not h.can_meta_context(CONTEXT):
        unsupported("the server does not offer the base:allocation context")
    return h


def _status(h, length, offset, flags=0):
    replies = _Replies()
    h.block_status(length, offset, replies, flags)
    return replies.extents()


@pytest.mark.writes
@spec(
    REQUESTS,
    MUST,
    quote="However the server MUST return at least one status descriptor, and "
    "since each status descriptor has a non-zero length, a client can always make progress on "
    "a successful return.",
)
def test_extents_are_consecutive_and_nonzero(server):
    h = _connect(server)
    h.pwrite(pattern(65536, 65536), 65536)
    extents = _status(h, 1 << 20, 0)
    expect_equal(extents[0][0], 0, "offset of the first descriptor")
    for offset, length, _ in extents:
        expect(length > 0, f"length of the descriptor at {offset}", expected="> 0", actual=length)


@pytest.mark.writes
@pytest.mark.parametrize("length", [4096, 1 << 20])
@spec(
    REQUESTS,
    MUST,
    quote="If the client used the `NBD_CMD_FLAG_REQ_ONE` flag, each chunk "
    "contains exactly one descriptor where the *length* of the descriptor MUST NOT be greater "
    "than the *length* of the request; otherwise, a chunk MAY contain multiple descriptors, "
    "and the final descriptor MAY extend beyond the original requested size if the server can "
    "determine a larger length without additional effort.",
)
def test_req_one_gives_one_extent_within_the_request(server, length):
    h = _connect(server)
    h.pwrite(pattern(8192, 4096), 8192)
    extents = _status(h, length, 0, nbd.CMD_FLAG_REQ_ONE)
    expect_equal(len(extents), 1, "descriptors with NBD_CMD_FLAG_REQ_ONE")
    expect(
        extents[0][1] <= length,
        "descriptor length with REQ_ONE",
        expected=f"<= {length}",
        actual=extents[0][1],
    )


@pytest.mark.writes
@spec(
    ALLOCATION,
    MUST,
    quote="`NBD_STATE_ZERO` (bit 1): if set, the block contents read as all "
    "zeroes; if clear, the block contents are not known.",
)
def test_data_is_never_reported_as_zero(server):
    """Every extent flagged NBD_STATE_ZERO reads as zeroes, after writes, zeroes and trims."""
    h = _connect(server)
    span = 1 << 20
    h.pwrite(pattern(0, 65536, tag=1), 0)
    h.pwrite(pattern(200000, 3000, tag=1), 200000)
    h.pwrite(b"\xff", 500001)
    if h.can_zero():
        h.zero(65536, 131072)
    if h.can_trim():
        h.trim(65536, 393216)
    h.pwrite(pattern(400000, 100, tag=2), 400000)
    offset = 0
    while offset < span:
        for start, length, flags in _status(h, span - offset, offset):
            if flags & nbd.STATE_ZERO:
                stop = min(start + length, span)
                expect_zero(
                    h.pread(stop - start, start), f"extent [{start}, {stop}) flagged NBD_STATE_ZERO"
                )
            offset = start + length
            if offset >= span:
                break


@pytest.mark.writes
@spec(
    ALLOCATION,
    SHOULD,
    quote="For the `base:allocation` context, the remainder of the flags "
    "field is reserved. Servers SHOULD set it to all-zero; clients MUST ignore unknown flags.",
)
def test_reserved_status_flags_are_zero(server):
    h = _connect(server)
    h.pwrite(pattern(4096, 4096), 4096)
    for offset, _, flags in _status(h, 1 << 20, 0):
        expect_equal(
            flags & ~(nbd.STATE_HOLE | nbd.STATE_ZERO),
            0,
            f"reserved flags of the descriptor at {offset}",
        )


@pytest.mark.writes
@spec(
    REQUESTS,
    SHOULD,
    quote="The server SHOULD use descriptor lengths that are an integer "
    "multiple of any advertised minimum block size, with an obvious exception at the end of "
    "the image if the image size itself is unaligned.",
)
def test_descriptor_lengths_are_multiples_of_minimum_block_size(start_server):
    h = _connect(start_server(ServerConfig(minimum_block_size=512)))
    minimum = h.get_block_size(nbd.SIZE_MINIMUM)
    if minimum <= 1:
        unsupported("the server advertises no minimum block size above 1")
    h.pwrite(pattern(minimum, minimum), minimum)
    extents = _status(h, 1 << 20, 0)
    for offset, length, _ in extents[:-1]:
        expect_equal(length % minimum, 0, f"length of the descriptor at {offset} modulo {minimum}")


@spec(
    REQUESTS,
    SHOULD,
    quote="The server SHOULD return `NBD_EINVAL` if it receives a "
    "`NBD_CMD_BLOCK_STATUS` request including one or more sectors beyond the size of the "
    "device.",
)
def test_block_status_beyond_the_end_gets_einval(server):
    h = _connect(server, strict=0)
    size = h.get_size()
    expect_nbd_error(
        lambda: h.block_status(8192, size - 4096, _Replies()),
        errno.EINVAL,
        "block status across the end of the export",
    )
