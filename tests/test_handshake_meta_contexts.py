"""NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.

Unit tests of protocol/handshake.py, driven by tests/handshake_client.py.
"""

from __future__ import annotations

import struct

import pytest

from reference_server.protocol.constants import Option, Reply
from reference_server.protocol.events import NeedData
from reference_server.protocol.export import ExportInfo
from reference_server.protocol.handshake import HandshakeLimits
from tests.handshake_client import SIZE, Client, OptReply, assert_still_haggling, meta_data

# ------------------------------------------------------ LIST_META_CONTEXT


def contexts(replies: list[OptReply]) -> list[tuple[int, bytes]]:
    out = []
    for r in replies:
        if r.type == Reply.META_CONTEXT:
            (cid,) = struct.unpack_from(">I", r.data)
            out.append((cid, r.data[4:]))
    return out


@pytest.mark.parametrize(
    ("queries", "listed"),
    [
        ((), [b"base:allocation"]),
        ((b"base:",), [b"base:allocation"]),
        ((b"base:allocation",), [b"base:allocation"]),
        ((b"base:nonsense",), []),
        ((b"x-unknown:thing",), []),
        ((b"qemu:dirty-bitmap:b", b"base:allocation"), [b"base:allocation"]),
    ],
)
def test_list_meta_context(queries: tuple[bytes, ...], listed: list[bytes]) -> None:
    c = Client()
    assert c.only(Option.STRUCTURED_REPLY).type == Reply.ACK
    event, replies = c.opt(Option.LIST_META_CONTEXT, meta_data(b"", *queries))
    assert isinstance(event, NeedData)
    assert replies[-1].type == Reply.ACK
    assert [name for _, name in contexts(replies)] == listed


def test_list_meta_context_does_not_select_anything() -> None:
    c = Client()
    c.only(Option.STRUCTURED_REPLY)
    c.opt(Option.LIST_META_CONTEXT, meta_data(b"", b"base:allocation"))
    assert c.go().negotiated.meta_contexts == {}


# Syntactically invalid payloads: "the server MUST fail the request with
# NBD_REP_ERR_INVALID" (NBD_OPT_LIST_META_CONTEXT).
MALFORMED_META = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x00" * 7, id="seven-bytes"),
    pytest.param(struct.pack(">I", 5) + b"ab" + struct.pack(">I", 0), id="name-past-end"),
    pytest.param(struct.pack(">II", 0, 1), id="query-count-without-query"),
    pytest.param(struct.pack(">II", 0, 0xFFFFFFFF), id="huge-query-count"),
    pytest.param(struct.pack(">III", 0, 1, 20) + b"base:", id="query-length-past-end"),
    pytest.param(struct.pack(">III", 0, 1, 2) + b"ab" + b"zz", id="trailing-bytes"),
    pytest.param(
        struct.pack(">III", 0, 2, 15) + b"base:allocation" + b"\x00\x00", id="truncated-length"
    ),
]


@pytest.mark.parametrize("data", MALFORMED_META)
@pytest.mark.parametrize("number", [Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT])
def test_malformed_meta_context_lengths_are_invalid(number: int, data: bytes) -> None:
    c = Client()
    c.only(Option.STRUCTURED_REPLY)
    assert c.only(number, data).type == Reply.ERR_INVALID
    assert_still_haggling(c)


@pytest.mark.parametrize("number", [Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT])
def test_meta_context_for_unknown_export_is_err_unknown(number: int) -> None:
    c = Client()
    c.only(Option.STRUCTURED_REPLY)
    assert c.only(number, meta_data(b"missing", b"base:allocation")).type == Reply.ERR_UNKNOWN


@pytest.mark.parametrize("number", [Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT])
def test_meta_context_query_without_namespace_colon_is_invalid(number: int) -> None:
    c = Client()
    c.only(Option.STRUCTURED_REPLY)
    assert c.only(number, meta_data(b"", b"allocation")).type == Reply.ERR_INVALID


def test_too_many_meta_context_queries_is_too_big() -> None:
    c = Client(limits=HandshakeLimits(max_meta_queries=4))
    c.only(Option.STRUCTURED_REPLY)
    data = meta_data(b"", *([b"base:allocation"] * 5))
    assert c.only(Option.LIST_META_CONTEXT, data).type == Reply.ERR_TOO_BIG
    _event, replies = c.opt(Option.LIST_META_CONTEXT, meta_data(b"", *([b"base:"] * 4)))
    assert replies[-1].type == Reply.ACK


def test_meta_context_query_longer_than_4096_is_refused() -> None:
    c = Client()
    c.only(Option.STRUCTURED_REPLY)
    reply = c.only(Option.LIST_META_CONTEXT, meta_data(b"", b"base:" + b"a" * 4092))
    assert reply.type in (Reply.ERR_INVALID, Reply.ERR_TOO_BIG)


# ------------------------------------------------------- SET_META_CONTEXT


def test_set_meta_context_without_structured_replies_is_invalid() -> None:
    # "This option MUST NOT be requested unless structured replies have been
    # negotiated first ... a server SHOULD send NBD_REP_ERR_INVALID".
    c = Client()
    assert c.only(Option.SET_META_CONTEXT, meta_data(b"", b"base:allocation")).type == (
        Reply.ERR_INVALID
    )
    assert c.go().negotiated.meta_contexts == {}


@pytest.mark.parametrize("first", [Option.STRUCTURED_REPLY, Option.EXTENDED_HEADERS])
def test_set_meta_context_selects_base_allocation_for_go(first: int) -> None:
    c = Client()
    assert c.only(first).type == Reply.ACK
    _event, replies = c.opt(Option.SET_META_CONTEXT, meta_data(b"", b"base:allocation"))
    assert [r.type for r in replies] == [Reply.META_CONTEXT, Reply.ACK]
    [(cid, name)] = contexts(replies)
    assert name == b"base:allocation"
    assert c.go().negotiated.meta_contexts == {cid: "base:allocation"}


@pytest.mark.parametrize("queries", [(), (b"base:",), (b"base:other",), (b"x-foo:bar",)], ids=str)
def test_set_meta_context_selecting_nothing_is_just_ack(queries: tuple[bytes, ...]) -> None:
    # "base:" MUST be ignored during SET; unknown leaves and namespaces are ignored.
    c = Client()
    c.only(Option.STRUCTURED_REPLY)
    _event, replies = c.opt(Option.SET_META_CONTEXT, meta_data(b"", *queries))
    assert [r.type for r in replies] == [Reply.ACK]
    assert c.go().negotiated.meta_contexts == {}


def test_set_meta_context_counts_only_for_the_export_it_named() -> None:
    exports = (ExportInfo("a", SIZE), ExportInfo("b", SIZE))
    c = Client(exports)
    c.only(Option.STRUCTURED_REPLY)
    c.opt(Option.SET_META_CONTEXT, meta_data(b"a", b"base:allocation"))
    assert c.go(b"b").negotiated.meta_contexts == {}


def test_failed_set_meta_context_clears_earlier_selection() -> None:
    # "Issuing this command replaces all previously-set metadata contexts
    # (including when this command fails)".
    c = Client()
    c.only(Option.STRUCTURED_REPLY)
    _, replies = c.opt(Option.SET_META_CONTEXT, meta_data(b"", b"base:allocation"))
    assert replies[-1].type == Reply.ACK
    assert c.only(Option.SET_META_CONTEXT, b"\x00").type == Reply.ERR_INVALID
    assert c.go().negotiated.meta_contexts == {}
