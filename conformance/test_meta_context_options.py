"""Option haggling for metadata contexts: NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.

Raw-wire checks (conformance.wire): libnbd will not send
NBD_OPT_SET_META_CONTEXT before structured replies, nor queries whose length
fields lie.  What the server lists and selects for each kind of query, then
the context names it sends: a namespace, a colon and a leaf-name, valid
strings, zero IDs in a list.
"""

from __future__ import annotations

import contextlib
import struct

import pytest

from conformance.spec import (
    MUST,
    SHOULD,
    SpecViolation,
    expect,
    expect_equal,
    expect_string,
    spec,
    unsupported,
)
from conformance.wire import BASE_ALLOCATION, Disconnected, Opt, Rep
from conformance.wire import messages as m
from conformance.wire import outcomes as o
from conformance.wire import session as s

LIST_META = "Values / Handshake phase / Option types"


@contextlib.contextmanager
def structured(server):
    with s.negotiated(server) as client:
        result = client.structured_reply()
        if result.type == Rep.ERR_UNSUP:
            unsupported("the server does not support NBD_OPT_STRUCTURED_REPLY")
        expect_equal(result.type.name, "ACK", "reply to NBD_OPT_STRUCTURED_REPLY")
        yield client


def _meta(client, option: Opt, name: bytes, queries: tuple[bytes, ...]):
    result = client.option(option, m.pack_meta_context_query(name, queries))
    if result.type == Rep.ERR_UNSUP:
        unsupported(f"the server does not support {option.name}")
    return result


@spec(
    "Values / Handshake phase / Option types",
    SHOULD,
    "If a client attempts to do so, a server SHOULD send `NBD_REP_ERR_INVALID`.",
)
def test_set_meta_context_before_structured_reply_is_invalid(server):
    """The EXTENDED_HEADERS extension also allows NBD_REP_ERR_EXT_HEADER_REQD."""
    with s.negotiated(server) as client:
        query = m.pack_meta_context_query(s.export_name(server), (BASE_ALLOCATION.encode(),))
        result = client.option(Opt.SET_META_CONTEXT, query)
        if result.type == Rep.ERR_UNSUP:
            unsupported("the server does not support NBD_OPT_SET_META_CONTEXT")
        expect(
            result.type in (Rep.ERR_INVALID, Rep.ERR_EXT_HEADER_REQD),
            "SET_META_CONTEXT before STRUCTURED_REPLY",
            "ERR_INVALID",
            result.type.name,
        )


def _list_meta_offers_base_allocation(server, queries):
    with structured(server) as client:
        name = s.export_name(server)
        selected = _meta(client, Opt.SET_META_CONTEXT, name, (BASE_ALLOCATION.encode(),))
        if BASE_ALLOCATION not in selected.contexts:
            unsupported("the server does not offer base:allocation")
        result = _meta(client, Opt.LIST_META_CONTEXT, name, queries)
        # The EXTENDED_HEADERS extension: a list naming a context with 64-bit status
        # (outside base:) SHOULD end with NBD_REP_ERR_EXT_HEADER_REQD without extended
        # headers, but "MUST NOT use this failure mode when the response is limited to the
        # "base:" namespace".
        beyond_base = [c for c in result.contexts if not c.startswith("base:")]
        allowed = ("ACK", "ERR_EXT_HEADER_REQD") if beyond_base else ("ACK",)
        expect(
            result.type.name in allowed,
            f"final reply to NBD_OPT_LIST_META_CONTEXT listing {sorted(result.contexts)}",
            " or ".join(allowed),
            result.type.name,
        )
        expect(
            BASE_ALLOCATION in result.contexts,
            "contexts listed",
            BASE_ALLOCATION,
            sorted(result.contexts),
        )


@spec(
    "Metadata querying / The `base:` metadata namespace",
    MUST,
    "the server MUST ignore this form during `NBD_OPT_SET_META_CONTEXT`, and MUST support this "
    "as a wildcard during `NBD_OPT_LIST_META_CONTEXT`",
)
def test_list_meta_context_base_wildcard_offers_base_allocation(server):
    _list_meta_offers_base_allocation(server, (b"base:",))


@spec(
    "Values / Handshake phase / Option types",
    MUST,
    "If zero queries are sent, then the server MUST return all the metadata contexts that are "
    "available to the client to select on the given export.",
)
def test_list_meta_context_without_queries_offers_base_allocation(server):
    _list_meta_offers_base_allocation(server, ())


@spec(
    "Values / Handshake phase / Option types",
    MUST,
    "If none of the query strings find any metadata contexts, the server MUST send a single reply "
    "of type `NBD_REP_ACK`.",
)
def test_list_meta_context_unknown_namespace_gets_ack_only(server):
    with structured(server) as client:
        result = _meta(
            client, Opt.LIST_META_CONTEXT, s.export_name(server), (b"x-conformance-unknown:leaf",)
        )
        expect_equal(
            result.describe(), "ACK(0 bytes)", "replies to a query of an unknown namespace"
        )


@pytest.mark.disruptive  # malformed framing: a fragile server may crash or hang
@spec(
    "Values / Handshake phase / Option types",
    MUST,
    "If the option request is syntactically invalid (such as a query length that would require "
    "reading beyond the original length given in the option header), the server MUST fail the "
    "request with `NBD_REP_ERR_INVALID`.",
)
def test_list_meta_context_query_past_end_gets_err_invalid(server):
    with structured(server) as client:
        name = s.export_name(server)
        data = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, 64) + b"base:"
        outcome = o.option_outcome(client, Opt.LIST_META_CONTEXT, data)
        if outcome == "ERR_UNSUP":
            unsupported("the server does not support NBD_OPT_LIST_META_CONTEXT")
        expect_equal(outcome, "ERR_INVALID", "query length beyond the option")
    s.assert_still_serving(server, "a LIST_META_CONTEXT query running past the option")


@spec("Values / Handshake phase / Option types", MUST)
def test_set_meta_context_selects_base_allocation(server):
    """ "the server MUST reply with a number of `NBD_REP_META_CONTEXT` replies, one for each
    selected metadata context, each with a unique metadata context ID, followed by
    `NBD_REP_ACK`"."""
    with structured(server) as client:
        result = _meta(client, Opt.SET_META_CONTEXT, s.export_name(server), (b"base:allocation",))
        expect_equal(result.type.name, "ACK", "final reply to NBD_OPT_SET_META_CONTEXT")
        names = [m.unpack_rep_meta_context(r.data)[1] for r in result.intermediate]
        if not names:
            unsupported("the server does not offer base:allocation")
        expect_equal(names, [BASE_ALLOCATION], "contexts selected")


@spec(
    "Values / Handshake phase / Option types",
    MUST,
    "If zero queries are sent, the server MUST select no metadata contexts.",
)
def test_set_meta_context_without_queries_selects_none(server):
    with structured(server) as client:
        result = _meta(client, Opt.SET_META_CONTEXT, s.export_name(server), ())
        expect_equal(result.describe(), "ACK(0 bytes)", "replies to SET_META_CONTEXT, no queries")


@spec(
    "Metadata querying / The `base:` metadata namespace",
    MUST,
    "If a `[leaf-name]` requested by the client is not recognized, the server MUST ignore it "
    "rather than report an error.",
)
def test_set_meta_context_ignores_unknown_base_leaf(server):
    with structured(server) as client:
        query = b"base:conformance-no-such-leaf"
        result = _meta(client, Opt.SET_META_CONTEXT, s.export_name(server), (query,))
        expect_equal(result.describe(), "ACK(0 bytes)", f"replies to SET_META_CONTEXT {query!r}")


@spec(
    "Metadata querying / The `base:` metadata namespace",
    MUST,
    "the server MUST ignore this form during `NBD_OPT_SET_META_CONTEXT`, and MUST support this "
    "as a wildcard during `NBD_OPT_LIST_META_CONTEXT`",
)
def test_set_meta_context_ignores_base_wildcard(server):
    with structured(server) as client:
        result = _meta(client, Opt.SET_META_CONTEXT, s.export_name(server), (b"base:",))
        expect_equal(result.describe(), "ACK(0 bytes)", "replies to SET_META_CONTEXT 'base:'")


# --------------------------------------------------------- metadata context names


def _contexts(server, *query_sets: tuple[bytes, ...]) -> list[bytes]:
    """The NBD_REP_META_CONTEXT payloads listed for each set of queries, on one connection."""
    with s.negotiated(server) as client:
        if client.structured_reply().type != Rep.ACK:
            unsupported("the server does not support NBD_OPT_STRUCTURED_REPLY")
        replies: list[bytes] = []
        try:
            for queries in query_sets:
                replies += client.list_meta_context(s.export_name(server), queries).context_replies
        except Disconnected as exc:
            raise SpecViolation("NBD_OPT_LIST_META_CONTEXT", "replies", str(exc)) from None
    if not replies:
        unsupported("the server lists no metadata context")
    return replies


@spec(
    "Metadata querying",
    MUST,
    "The name MUST consist of a namespace, followed by a colon, followed by a leaf-name.",
)
def test_context_names_are_namespace_colon_leaf(server):
    for data in _contexts(server, (), (b"base:",)):
        name = data[4:]
        namespace, colon, _leaf = name.partition(b":")
        expect(namespace and colon, "metadata context name", "namespace:leaf-name", name)


@spec(
    "Metadata querying",
    MUST,
    "The entire name (namespace, colon, and leaf-name) MUST follow the restrictions for strings "
    "as laid out earlier in this document.",
)
def test_context_names_are_valid_strings(server):
    for data in _contexts(server, (), (b"base:",)):
        expect_string(data[4:], "metadata context name")


@spec(
    "Values / Handshake phase / Option reply types",
    MUST,
    "This is not required to be a human-readable string, but it MUST be valid UTF-8 data.",
)
def test_context_names_are_utf8(server):
    for data in _contexts(server, ()):
        try:
            data[4:].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecViolation("metadata context name", "valid UTF-8", str(exc)) from None


@spec(
    LIST_META,
    MUST,
    "However each namespace returned MUST begin with the relevant namespace, followed by a colon, "
    "and then other UTF-8 characters, with the entire string following the restrictions for "
    "strings set out earlier in this document.",
)
def test_listed_contexts_begin_with_the_queried_namespace(server):
    for data in _contexts(server, (b"base:",)):
        expect(
            data[4:].startswith(b"base:"),
            "context listed for the query 'base:'",
            "a name beginning 'base:'",
            data[4:],
        )
        expect_string(data[4:], "context listed for the query 'base:'")


@spec(
    LIST_META,
    SHOULD,
    "The metadata context ID in these replies is reserved and SHOULD be set to zero",
)
def test_listed_context_ids_are_zero(server):
    for data in _contexts(server, (), (BASE_ALLOCATION.encode(),)):
        (context_id,) = struct.unpack_from(">I", data)
        expect_equal(context_id, 0, f"context ID listed for {data[4:]!r}")


@spec(LIST_META, SHOULD, "In this case, the server SHOULD NOT fail with `NBD_REP_ERR_TOO_BIG`.")
def test_list_of_all_contexts_is_not_too_big(server):
    with s.negotiated(server) as client:
        if client.structured_reply().type != Rep.ACK:
            unsupported("the server does not support NBD_OPT_STRUCTURED_REPLY")
        client.send_option(
            Opt.LIST_META_CONTEXT, m.pack_meta_context_query(s.export_name(server), ())
        )
        result = client.recv_option_result()
    expect(
        result.type != Rep.ERR_TOO_BIG,
        "NBD_OPT_LIST_META_CONTEXT with no query",
        "no NBD_REP_ERR_TOO_BIG",
        result.describe(),
    )
