"""BLOCK_STATUS replies, with compact and extended descriptors.

Unit tests of protocol/transmission.py, driven by tests/transmission_driver.py.
"""

from __future__ import annotations

import struct

import pytest

from reference_server.backends.base import Extent
from reference_server.backends.memory import PAGE_SIZE, MemoryBackend
from reference_server.protocol.constants import ChunkType, Command, Errno, StateFlag
from reference_server.protocol.export import ExportInfo
from tests.transmission_driver import PATTERN, REQ_ONE, SIZE, Conn, Reply, conn, negotiate

# ------------------------------------------------------------ BLOCK_STATUS


def descriptors(reply: Reply, extended: bool) -> tuple[int, list[tuple[int, int]]]:
    if extended:
        assert reply.type == ChunkType.BLOCK_STATUS_EXT
        cid, count = struct.unpack_from(">II", reply.payload)
        assert len(reply.payload) == 8 + 16 * count and count > 0
        pairs = list(struct.iter_unpack(">QQ", reply.payload[8:]))
    else:
        assert reply.type == ChunkType.BLOCK_STATUS
        (cid,) = struct.unpack_from(">I", reply.payload)
        assert (len(reply.payload) - 4) % 8 == 0 and len(reply.payload) > 4
        pairs = list(struct.iter_unpack(">II", reply.payload[4:]))
    assert all(length > 0 for length, _ in pairs), "descriptor of zero length"
    return cid, pairs


@pytest.mark.parametrize("extended", [False, True])
def test_block_status_reports_holes_and_data(extended: bool) -> None:
    c = conn(structured=True, extended=extended, meta=True)
    c.write(PAGE_SIZE, PATTERN)
    [reply] = c.call(Command.BLOCK_STATUS, 0, 4 * PAGE_SIZE)
    cid, pairs = descriptors(reply, extended)
    assert cid in c.tx.negotiated.meta_contexts
    hole = StateFlag.HOLE | StateFlag.ZERO
    assert pairs == [(PAGE_SIZE, hole), (PAGE_SIZE, 0), (2 * PAGE_SIZE, hole)]


@pytest.mark.parametrize("extended", [False, True])
def test_block_status_req_one_returns_one_extent_within_length(extended: bool) -> None:
    c = conn(structured=True, extended=extended, meta=True)
    [reply] = c.call(Command.BLOCK_STATUS, 0, 1000, flags=REQ_ONE)
    _, pairs = descriptors(reply, extended)
    assert len(pairs) == 1 and pairs[0][0] <= 1000
    c.write(0, PATTERN)
    [reply] = c.call(Command.BLOCK_STATUS, 0, 3 * PAGE_SIZE, flags=REQ_ONE)
    assert descriptors(reply, extended)[1] == [(PAGE_SIZE, 0)]


def test_block_status_without_meta_context_is_einval() -> None:
    c = conn(structured=True)
    assert c.error_of(Command.BLOCK_STATUS, 0, 4096) == Errno.EINVAL


def test_block_status_past_the_end_is_einval() -> None:
    c = conn(structured=True, meta=True)
    assert c.error_of(Command.BLOCK_STATUS, SIZE - 512, 1024) == Errno.EINVAL


def test_block_status_extents_do_not_overshoot_before_the_last() -> None:
    # "the sum of the length fields of the first N-1 extents (if any) MUST be
    # less than the requested length".
    c = conn(structured=True, meta=True)
    for i in range(0, 8, 2):
        c.write(i * PAGE_SIZE, b"x")
    [reply] = c.call(Command.BLOCK_STATUS, 100, 5 * PAGE_SIZE)
    _, pairs = descriptors(reply, False)
    assert sum(length for length, _ in pairs[:-1]) < 5 * PAGE_SIZE


class _ManyExtentsBackend(MemoryBackend):
    def extents(self, length: int, offset: int) -> list[Extent]:
        flags = [StateFlag(0), StateFlag.HOLE | StateFlag.ZERO]
        return [Extent(1, flags[i % 2]) for i in range(min(length, 5))]


def test_block_status_req_one_with_many_extents_sends_the_first() -> None:
    c = Conn(negotiate(ExportInfo("", SIZE), structured=True, meta=True), _ManyExtentsBackend(SIZE))
    [reply] = c.call(Command.BLOCK_STATUS, 0, 100, flags=REQ_ONE)
    assert descriptors(reply, False)[1] == [(1, 0)]
    [reply] = c.call(Command.BLOCK_STATUS, 0, 100)
    assert len(descriptors(reply, False)[1]) == 5


def test_block_status_on_a_sparse_tebibyte_uses_64_bit_lengths_when_extended() -> None:
    tib = 1 << 40
    export = ExportInfo("", tib)
    c = Conn(negotiate(export, extended=True, meta=True), MemoryBackend(tib))
    [reply] = c.call(Command.BLOCK_STATUS, 0, tib)
    assert descriptors(reply, True)[1] == [(tib, StateFlag.HOLE | StateFlag.ZERO)]
    # Compact descriptors: 32-bit lengths, never beyond the request.
    c = Conn(negotiate(export, structured=True, meta=True), MemoryBackend(tib))
    [reply] = c.call(Command.BLOCK_STATUS, 0, 0xFFFFFFFF)
    _, pairs = descriptors(reply, False)
    assert pairs[0][0] <= 0xFFFFFFFF and pairs[0][1] == StateFlag.HOLE | StateFlag.ZERO


def test_block_status_of_zero_length_is_an_error_not_a_disconnect() -> None:
    # "The client SHOULD NOT request a status length of 0; ... the server
    # SHOULD NOT disconnect."
    c = conn(structured=True, meta=True)
    assert c.error_of(Command.BLOCK_STATUS, 0, 0) == Errno.EINVAL
    assert c.closed is None


class _NoExtentsBackend(MemoryBackend):
    def extents(self, length: int, offset: int) -> list[Extent]:
        return []


def test_block_status_when_the_backend_reports_nothing_is_an_error() -> None:
    c = Conn(negotiate(ExportInfo("", SIZE), structured=True, meta=True), _NoExtentsBackend(SIZE))
    assert c.error_of(Command.BLOCK_STATUS, 0, 4096) != 0
