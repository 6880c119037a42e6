"""Regression checks for TLS bugs real NBD servers shipped, each named after its CVE.

State negotiated in clear must not survive NBD_OPT_STARTTLS (CVE-2021-3716), and
clients that have not completed TLS learn nothing of the export (CVE-2019-14850).
Each check drives the interaction over the raw wire, then proves the server
still serves a well-behaved client (conformance.wire.session.assert_still_serving).
"""

from __future__ import annotations

import pytest

from conformance.servers.base import ServerConfig
from conformance.spec import MUST, expect, expect_equal, spec, unsupported
from conformance.wire import Info, Opt, Rep
from conformance.wire import messages as m
from conformance.wire import session as s

# Reproducers of crashes and hangs: against a server the suite did not start
# they run only with --allow-disruptive.
pytestmark = pytest.mark.disruptive

# ----------------------------------------------------------- CVE-2021-3716


@pytest.fixture
def tls_server(start_server):
    return start_server(ServerConfig(tls=True))


@spec(
    "Values / Handshake phase / Option types",
    MUST,
    "When this command succeeds, the server MUST NOT preserve any negotiation state (such as a "
    "request for `NBD_OPT_STRUCTURED_REPLY`, or metadata contexts from "
    "`NBD_OPT_SET_META_CONTEXT`) issued before this command.",
)
@pytest.mark.parametrize("state", ["structured-reply", "meta-context", "extended-headers"])
def test_cve_2021_3716_plaintext_state_does_not_survive_starttls(tls_server, state):
    """nbdkit kept NBD_OPT_STRUCTURED_REPLY negotiated in plaintext across STARTTLS.  The same
    for NBD_OPT_EXTENDED_HEADERS (the extension's version of the sentence names it)."""
    name = s.export_name(tls_server)
    client = s.connect(tls_server)
    try:
        client.negotiate()
        if state == "extended-headers":
            client.option(Opt.EXTENDED_HEADERS)
        client.option(Opt.STRUCTURED_REPLY)
        client.set_meta_context(name, (b"base:allocation",))
        expect_equal(
            client.starttls(s.require_tls_context(tls_server)).type.name, "ACK", "STARTTLS"
        )
        if state == "meta-context" and client.structured_reply().type != Rep.ACK:
            unsupported("the server does not support NBD_OPT_STRUCTURED_REPLY")
        expect_equal(client.go(name).type.name, "ACK", "NBD_OPT_GO over TLS")
        if state in ("structured-reply", "extended-headers"):
            reply = client.read(0, 512)
            expect(
                reply.is_simple,
                "READ reply after STARTTLS without STRUCTURED_REPLY over TLS",
                "a simple reply",
                [type(x).__name__ for x in reply.messages],
            )
        else:
            reply = client.block_status(0, 4096)
            expect(
                not reply.block_status,
                "BLOCK_STATUS with contexts chosen only in clear",
                "no status chunk (contexts were dropped)",
                reply.block_status,
            )
        client.disconnect()
    finally:
        client.close()


# ---------------------------------------------------------- CVE-2019-14850


@spec(
    "TLS support / Server-side requirements / FORCEDTLS mode",
    MUST,
    "If the server receives any other option, including `NBD_OPT_INFO` and unsupported options, "
    "it MUST reply with `NBD_REP_ERR_TLS_REQD` if TLS has not been initiated; `NBD_OPT_INFO` is "
    "included as in this mode, all exports are TLS-only.",
)
def test_cve_2019_14850_no_export_access_before_tls(tls_server):
    """nbdkit opened the backend for clients that had not completed TLS.  Backend work is not
    visible on the wire; what is: a burst of unauthenticated clients asking for the export in
    clear learns nothing about it, and the authenticated client is then served."""
    name = s.export_name(tls_server)
    clients = []
    try:
        for option in (Opt.INFO, Opt.GO) * 4:
            client = s.connect(tls_server)
            clients.append(client)
            client.negotiate()
            result = client.option(option, m.pack_name_and_infos(name, (Info.BLOCK_SIZE,)))
            expect_equal(
                result.describe().split("(")[0], "ERR_TLS_REQD", f"{option.name} before TLS"
            )
    finally:
        for client in clients:
            client.close()
    s.assert_still_serving(tls_server, "clients asking for the export before TLS")
