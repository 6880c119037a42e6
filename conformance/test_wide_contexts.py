"""Metadata contexts whose status needs 64 bits (the EXTENDED_HEADERS extension).

"Most metadata contexts expose no more than 32 bits of information, but some
metadata contexts have associated data that is 64 bits in length; using such
contexts requires the client to first negotiate extended headers"
("Metadata querying").  No context of the ``base:`` namespace is one, so the
suite cannot know one by itself: the ``wide_context`` fixture names the one
the server offers (``--wide-context=NAME``, or the profile's; the reference
server's is ``x-reference:next-data``), and every check here is UNSUPPORTED
without one.  Raw-wire checks: libnbd 1.14 negotiates no extended headers.
"""

from __future__ import annotations

import contextlib

import pytest

from conformance.spec import MUST, SHOULD, expect, expect_equal, spec, unsupported
from conformance.wire import BASE_ALLOCATION, Opt, Rep, ReplyType
from conformance.wire import messages as m
from conformance.wire import session as s

# Heading paths of proto.md; the quotes are the extension's (ledger: extension.toml).
OPTION_TYPES = "Values / Handshake phase / Option types"
STATUS_EXT = "Values / Transmission phase / Structured reply types"


@contextlib.contextmanager
def _negotiating(server, option: Opt):
    """A client in option haggling after OPTION (STRUCTURED_REPLY or EXTENDED_HEADERS) was ACKed."""
    with s.negotiated(server) as client:
        extended = option == Opt.EXTENDED_HEADERS
        result = client.extended_headers() if extended else client.structured_reply()
        if result.type == Rep.ERR_UNSUP:
            unsupported(f"the server does not support NBD_OPT_{option.name}")
        expect_equal(result.type.name, "ACK", f"reply to NBD_OPT_{option.name}")
        yield client


def _answer(client, option: Opt, server, queries: tuple[bytes, ...]):
    result = client.option(option, m.pack_meta_context_query(s.export_name(server), queries))
    if result.type == Rep.ERR_UNSUP:
        unsupported(f"the server does not support NBD_OPT_{option.name}")
    return result


# ----------------------------------------------------- without extended headers


@spec(
    OPTION_TYPES,
    MUST,
    "If a client requests a metadata context that utilizes 64-bit status, but has not yet "
    "negotiated extended headers, the server MUST either omit that context from its successful "
    "reply, or else fail the request with `NBD_REP_ERR_EXT_HEADER_REQD`.",
)
@pytest.mark.parametrize("with_base", [False, True], ids=["alone", "with-base-allocation"])
def test_set_wide_context_without_extended_headers_omits_it_or_fails(
    wide_context, server, with_base
):
    """After structured replies only.  Asked for with base:allocation, an option that
    succeeds still selects base:allocation, and BLOCK_STATUS then answers it alone, in
    32-bit chunks."""
    wide = wide_context.encode()
    with _negotiating(server, Opt.STRUCTURED_REPLY) as client:
        queries = (wide,)
        if with_base:
            alone = _answer(client, Opt.SET_META_CONTEXT, server, (BASE_ALLOCATION.encode(),))
            if BASE_ALLOCATION not in alone.contexts:
                unsupported("the server does not offer base:allocation")
            queries = (wide, BASE_ALLOCATION.encode())
        result = _answer(client, Opt.SET_META_CONTEXT, server, queries)
        what = (
            f"NBD_OPT_SET_META_CONTEXT of {b', '.join(queries).decode()} without extended headers"
        )
        if not result.ok:
            expect_equal(result.type.name, "ERR_EXT_HEADER_REQD", f"final reply to {what}")
            return
        expect(
            wide_context not in result.contexts,
            f"contexts selected by {what}",
            f"{wide_context} omitted",
            sorted(result.contexts),
        )
        if not with_base:
            return
        expect(
            BASE_ALLOCATION in result.contexts,
            f"contexts selected by {what}",
            f"{BASE_ALLOCATION} still selected",
            sorted(result.contexts),
        )
        go = client.go(s.export_name(server))
        expect_equal(go.type.name, "ACK", "reply to NBD_OPT_GO")
        reply = client.block_status(0, min(go.export.size, 1 << 20))
        statuses = [(c.type.name, m.parse_chunk(c)) for c in reply.chunks]
        found = [(kind, getattr(p, "context_id", None)) for kind, p in statuses]
        expect_equal(
            found,
            [("BLOCK_STATUS", result.contexts[BASE_ALLOCATION])],
            "status chunks (type, context ID) for base:allocation alone",
        )


@spec(
    OPTION_TYPES,
    SHOULD,
    "although it SHOULD then conclude the overall response with the `NBD_REP_ERR_EXT_HEADER_REQD` "
    "error to inform the client that extended headers are required to make full use of all "
    "contexts advertised.",
)
@pytest.mark.parametrize("queries", ["none", "its-name"])
def test_list_advertising_wide_context_without_extended_headers_ends_ext_header_reqd(
    wide_context, server, queries
):
    """With no query (every context) and with the context's own name as the query."""
    asked = () if queries == "none" else (wide_context.encode(),)
    with _negotiating(server, Opt.STRUCTURED_REPLY) as client:
        result = _answer(client, Opt.LIST_META_CONTEXT, server, asked)
    if wide_context not in result.contexts:
        unsupported(
            f"the server does not advertise {wide_context} without extended headers "
            "(which it MAY do): the SHOULD does not apply"
        )
    expect_equal(
        result.type.name,
        "ERR_EXT_HEADER_REQD",
        f"final reply to NBD_OPT_LIST_META_CONTEXT listing {wide_context} without extended "
        f"headers ({result.describe()})",
    )


# --------------------------------------------------------- with extended headers


@spec(
    OPTION_TYPES,
    MUST,
    "nor may the server use this failure mode when the client has already negotiated extended "
    "headers.",
)
def test_list_of_wide_context_with_extended_headers_ends_with_ack(wide_context, server):
    with _negotiating(server, Opt.EXTENDED_HEADERS) as client:
        result = _answer(client, Opt.LIST_META_CONTEXT, server, ())
    expect(
        wide_context in result.contexts,
        "contexts listed with extended headers",
        wide_context,
        sorted(result.contexts),
    )
    expect_equal(
        result.type.name, "ACK", "final reply to NBD_OPT_LIST_META_CONTEXT with extended headers"
    )


@spec(
    STATUS_EXT,
    MUST,
    "Note that when extended headers are in use, the extended reply chunk MUST be used, "
    "regardless of whether the client's hinted effect length was less than 32 bits or the server "
    "is responding with a length less than 32 bits despite a client's larger request.",
)
def test_wide_context_is_served_with_extended_headers(wide_context, server):
    """Selected with extended headers, the context is answered in BLOCK_STATUS_EXT chunks."""
    with _negotiating(server, Opt.EXTENDED_HEADERS) as client:
        name = s.export_name(server)
        result = _answer(client, Opt.SET_META_CONTEXT, server, (wide_context.encode(),))
        expect_equal(result.type.name, "ACK", f"SET_META_CONTEXT {wide_context}, extended headers")
        expect(
            wide_context in result.contexts,
            "contexts selected with extended headers",
            wide_context,
            sorted(result.contexts),
        )
        go = client.go(name)
        expect_equal(go.type.name, "ACK", "reply to NBD_OPT_GO")
        reply = client.block_status(0, min(go.export.size, 1 << 20))
        chunks = [(c.type, m.parse_chunk(c)) for c in reply.chunks]
        found = [(kind.name, getattr(p, "context_id", None)) for kind, p in chunks]
        expect_equal(
            found,
            [(ReplyType.BLOCK_STATUS_EXT.name, result.contexts[wide_context])],
            f"status chunks (type, context ID) for {wide_context}",
        )
