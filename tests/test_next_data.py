"""x-reference:next-data, the reference server's metadata context with 64-bit status.

Its statuses (protocol/next_data.py), its negotiation with and without
extended headers (protocol/meta_contexts.py through the Handshake, driven by
tests/handshake_client.py), its BLOCK_STATUS replies on an export larger
than 4 GiB (tests/transmission_driver.py), where storage says data next
begins (the backends), and ``--next-data`` on the command line.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from reference_server import cli
from reference_server.backends.file import FileBackend
from reference_server.backends.memory import PAGE_SIZE, MemoryBackend
from reference_server.protocol import next_data
from reference_server.protocol.constants import ChunkType, Command, Option, Reply, StateFlag
from reference_server.protocol.export import ExportInfo
from tests.handshake_client import SIZE, Client, OptReply, meta_data
from tests.transmission_driver import PATTERN, REQ_ONE, Conn, negotiate

NAME = b"x-reference:next-data"
BASE = b"base:allocation"
HOLE = int(StateFlag.HOLE | StateFlag.ZERO)
GiB = 1 << 30

# ------------------------------------------------------------ the statuses


def test_a_hole_is_told_where_the_next_data_begins_and_data_gets_zero() -> None:
    extents = [(100, HOLE), (50, 0), (30, HOLE), (20, 0)]
    assert next_data.statuses(1000, extents, 10_000, None) == [1100, 0, 1180, 0]
    assert next_data.lookahead(1000, extents, 10_000) is None


def test_a_trailing_hole_needs_storage_unless_it_reaches_the_end() -> None:
    extents = [(10, 0), (90, HOLE)]
    assert next_data.lookahead(0, extents, 1000) == 100
    assert next_data.statuses(0, extents, 1000, 700) == [0, 700]
    assert next_data.lookahead(900, extents, 1000) is None
    assert next_data.statuses(900, extents, 1000, None) == [0, 1000]


def test_consecutive_holes_share_the_data_after_both() -> None:
    extents = [(10, HOLE), (10, int(StateFlag.HOLE)), (5, int(StateFlag.ZERO))]
    # NBD_STATE_ZERO alone is allocated zeroes: data, not a hole.
    assert next_data.statuses(0, extents, 100, None) == [20, 20, 0]


# ------------------------------------------------------------- negotiation


def names(replies: list[OptReply]) -> list[tuple[int, bytes]]:
    return [
        (struct.unpack_from(">I", r.data)[0], r.data[4:])
        for r in replies
        if r.type == Reply.META_CONTEXT
    ]


def client(*, extended: bool, offered: bool = True) -> Client:
    c = Client((ExportInfo("", SIZE, next_data=offered),))
    option = Option.EXTENDED_HEADERS if extended else Option.STRUCTURED_REPLY
    assert c.only(option).type == Reply.ACK
    return c


@pytest.mark.parametrize(
    ("queries", "listed"),
    [
        ((), [BASE, NAME]),
        ((b"x-reference:",), [NAME]),
        ((NAME,), [NAME]),
    ],
)
def test_list_without_extended_headers_names_it_then_ends_ext_header_reqd(
    queries: tuple[bytes, ...], listed: list[bytes]
) -> None:
    _event, replies = client(extended=False).opt(Option.LIST_META_CONTEXT, meta_data(b"", *queries))
    assert names(replies) == [(0, name) for name in listed]
    assert replies[-1].type == Reply.ERR_EXT_HEADER_REQD
    assert "NBD_OPT_EXTENDED_HEADERS" in replies[-1].message


def test_list_limited_to_base_ends_with_ack() -> None:
    """The extension: a server "MUST NOT use this failure mode when the response is limited
    to the "base:" namespace"."""
    _event, replies = client(extended=False).opt(Option.LIST_META_CONTEXT, meta_data(b"", b"base:"))
    assert names(replies) == [(0, BASE)]
    assert replies[-1].type == Reply.ACK


def test_list_with_extended_headers_ends_with_ack() -> None:
    _event, replies = client(extended=True).opt(Option.LIST_META_CONTEXT, meta_data(b""))
    assert names(replies) == [(0, BASE), (0, NAME)]
    assert replies[-1].type == Reply.ACK


def test_set_without_extended_headers_omits_it_and_keeps_base_allocation() -> None:
    c = client(extended=False)
    _event, replies = c.opt(Option.SET_META_CONTEXT, meta_data(b"", NAME, BASE))
    assert names(replies) == [(1, BASE)]
    assert replies[-1].type == Reply.ACK
    _event, replies = c.opt(Option.SET_META_CONTEXT, meta_data(b"", NAME))
    assert [r.type for r in replies] == [Reply.ACK]
    assert c.go().negotiated.meta_contexts == {}


def test_set_with_extended_headers_selects_both() -> None:
    c = client(extended=True)
    _event, replies = c.opt(Option.SET_META_CONTEXT, meta_data(b"", NAME, BASE))
    assert names(replies) == [(1, BASE), (2, NAME)]
    assert c.go().negotiated.meta_contexts == {1: BASE.decode(), 2: NAME.decode()}


def test_a_bare_namespace_selects_nothing() -> None:
    c = client(extended=True)
    _event, replies = c.opt(Option.SET_META_CONTEXT, meta_data(b"", b"x-reference:"))
    assert [r.type for r in replies] == [Reply.ACK]


def test_not_offered_without_next_data() -> None:
    c = client(extended=True, offered=False)
    _event, replies = c.opt(Option.LIST_META_CONTEXT, meta_data(b""))
    assert names(replies) == [(0, BASE)]
    _event, replies = c.opt(Option.SET_META_CONTEXT, meta_data(b"", NAME))
    assert [r.type for r in replies] == [Reply.ACK]


# ----------------------------------------------------------- BLOCK_STATUS


def statuses_by_context(
    c: Conn, offset: int, length: int, flags: int = 0
) -> dict[bytes, list[tuple[int, int]]]:
    by_id = {i: n.encode() for i, n in c.tx.negotiated.meta_contexts.items()}
    out = {}
    for reply in c.call(Command.BLOCK_STATUS, offset, length, flags=flags):
        assert reply.type == ChunkType.BLOCK_STATUS_EXT
        cid, count = struct.unpack_from(">II", reply.payload)
        out[by_id[cid]] = list(struct.iter_unpack(">QQ", reply.payload[8:]))
        assert len(out[by_id[cid]]) == count
    return out


def large() -> Conn:
    """An extended-headers connection to a sparse 6 GiB export, data at 5 GiB only."""
    export = ExportInfo("", 6 * GiB, next_data=True)
    c = Conn(negotiate(export, extended=True, meta=True, contexts=(NAME,)), MemoryBackend(6 * GiB))
    assert c.write(5 * GiB, PATTERN) == 0
    return c


def test_block_status_status_above_32_bits_on_a_large_export() -> None:
    c = large()
    found = statuses_by_context(c, 0, 6 * GiB)
    rest = 6 * GiB - 5 * GiB - PAGE_SIZE
    assert found[BASE] == [(5 * GiB, HOLE), (PAGE_SIZE, 0), (rest, HOLE)]
    assert found[NAME] == [(5 * GiB, 5 * GiB), (PAGE_SIZE, 0), (rest, 6 * GiB)]
    assert found[NAME][0][1] > 0xFFFFFFFF


def test_a_hole_to_the_end_of_the_range_looks_beyond_it() -> None:
    c = large()
    found = statuses_by_context(c, 4096, 1 << 20)
    assert found[NAME] == [(1 << 20, 5 * GiB)]
    found = statuses_by_context(c, 0, 1 << 20, flags=REQ_ONE)
    assert found[NAME] == [(1 << 20, 5 * GiB)]
    assert found[BASE] == [(1 << 20, HOLE)]


# ------------------------------------------------------------------ storage


def test_memory_backend_next_data() -> None:
    backend = MemoryBackend(8 * PAGE_SIZE)
    assert backend.next_data(0) == 8 * PAGE_SIZE
    backend.pwrite(b"x", 3 * PAGE_SIZE + 5, fua=False)
    assert backend.next_data(0) == 3 * PAGE_SIZE
    assert backend.next_data(3 * PAGE_SIZE + 9) == 3 * PAGE_SIZE + 9
    assert backend.next_data(4 * PAGE_SIZE) == 8 * PAGE_SIZE


def test_file_backend_next_data_is_seek_data(tmp_path: Path) -> None:
    path = tmp_path / "sparse.raw"
    with path.open("wb") as f:
        f.truncate(16 << 20)
        f.seek(8 << 20)
        f.write(b"data" * 1024)
    backend = FileBackend(str(path))
    try:
        found = backend.next_data(0)
        # A filesystem without SEEK_DATA reports everything as data.
        assert found in (0, 8 << 20)
        if found:
            assert backend.next_data((8 << 20) + (1 << 20)) == 16 << 20
    finally:
        backend.close()


def test_the_default_walks_extents() -> None:
    backend = MemoryBackend(8 * PAGE_SIZE)
    backend.pwrite(b"x", 6 * PAGE_SIZE, fua=False)
    walked = super(MemoryBackend, backend).next_data
    assert walked(0) == 6 * PAGE_SIZE
    assert walked(7 * PAGE_SIZE) == 8 * PAGE_SIZE


# --------------------------------------------------------------- the CLI


def test_next_data_option_offers_it_on_every_export(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--memory", "1M", "--next-data", "--export", "name=b,memory=1M"]
    args = cli.build_parser().parse_args(argv)
    infos = [cli._export(args, s, MemoryBackend(1 << 20)).info for s in cli.export_specs(args)]
    assert [i.next_data for i in infos] == [True, True]
    default = cli.build_parser().parse_args(["--memory", "1M"])
    assert not cli._export(default, cli.export_specs(default)[0], MemoryBackend(1)).info.next_data
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    assert "x-reference:next-data" in capsys.readouterr().out


def test_file_backend_next_data_beyond_the_end(tmp_path: Path) -> None:
    path = tmp_path / "small.raw"
    path.write_bytes(os.urandom(4096))
    backend = FileBackend(str(path))
    try:
        assert backend.next_data(4096) == 4096
    finally:
        backend.close()
