"""SELECTIVETLS: a server with a plain export and a TLS-only one, and the client's choice of TLS.

"TLS support / Server-side requirements / SELECTIVETLS mode": TLS is offered,
mandatory on the TLS-only export and optional on the other.  Before TLS the
TLS-only export gets NBD_REP_ERR_TLS_REQD to NBD_OPT_INFO and NBD_OPT_GO, and
NBD_OPT_EXPORT_NAME on it ends the session; NBD_REP_ERR_TLS_REQD is never
sent for anything else, nor at all once TLS is up.  Also here: the mode of a
connection stays what it was ("TLS support / Server-side requirements"), and
a client that is not fixed newstyle is served in NOTLS mode.

The configuration is ``ServerConfig(tls_only_export=...)``: a profile that
cannot serve a TLS-only export beside a plain one makes these checks
unsupported.  Raw-wire checks (conformance.wire): libnbd 1.14 sends neither
options in clear to a TLS server nor NBD_OPT_STARTTLS on its own.
"""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from conformance.servers.base import DEFAULT_SIZE, ServerConfig
from conformance.spec import MUST, SHOULD, expect, expect_equal, spec, unsupported
from conformance.tlsutil import client_context
from conformance.wire import Disconnected, Errno, Opt, Rep
from conformance.wire import messages as m
from conformance.wire import session as s
from conformance.wire.client import WireClient
from conformance.wire.results import OptionResult

#: The name of the export served only over TLS, beside the server's plain export.
TLS_ONLY_EXPORT = "conformance-tls-only"
TLS_ONLY = TLS_ONLY_EXPORT.encode()
UNKNOWN = b"conformance-no-such-export"
SELECTIVE = "TLS support / Server-side requirements / SELECTIVETLS mode"
MODES = "TLS support / Server-side requirements"
WAIT = 5.0


@pytest.fixture
def selective_server(start_server: Any) -> Any:
    """A server offering TLS, with the plain export and TLS_ONLY_EXPORT (SELECTIVETLS)."""
    return start_server(ServerConfig(tls_only_export=TLS_ONLY_EXPORT))


def tls_context(server: Any) -> ssl.SSLContext:
    if server.tls_dir is None:
        unsupported("no TLS credentials for this server")
    return client_context(server.tls_dir)


def _not_tls_reqd(result: OptionResult, what: str) -> None:
    expect(
        result.type != Rep.ERR_TLS_REQD,
        what,
        "anything but NBD_REP_ERR_TLS_REQD",
        result.describe(),
    )


def _upgrade(client: WireClient, server: Any) -> None:
    result = client.option(Opt.STARTTLS)
    expect_equal(result.type.name, "ACK", "reply to NBD_OPT_STARTTLS before TLS")
    try:
        client.upgrade_tls(tls_context(server))
    except (ssl.SSLError, OSError) as exc:
        expect(False, "TLS handshake after NBD_REP_ACK", "a TLS session", repr(exc))


# ------------------------------------------------------------------ STARTTLS


@spec(
    SELECTIVE,
    MUST,
    "If the server receives `NBD_OPT_STARTTLS` prior to negotiating TLS, it MUST reply with "
    "`NBD_REP_ACK` and initiate TLS as set out under 'FORCEDTLS' above.",
)
def test_selective_starttls_gets_ack_then_tls(selective_server):
    """STARTTLS as the first option, and after options answered in clear (the plain export's
    NBD_OPT_INFO, the TLS-only export's refusal, NBD_OPT_LIST): NBD_REP_ACK, a TLS session,
    and the TLS-only export served over it."""
    plain = s.export_name(selective_server)
    for before in ((), (Opt.LIST, Opt.INFO, Opt.GO)):
        with s.in_clear(selective_server) as client:
            for option in before:
                name = TLS_ONLY if option == Opt.GO else plain
                client.option(option, s.option_payload(option, name))
            _upgrade(client, selective_server)
            after = f"after {[o.name for o in before]}" if before else "as the first option"
            go = client.go(TLS_ONLY)
            expect_equal(go.type.name, "ACK", f"NBD_OPT_GO on the TLS-only export over TLS {after}")
            expect_equal(client.read(0, 4096).error, Errno.OK, "READ of the TLS-only export")
            client.disconnect()


@spec(
    SELECTIVE,
    MUST,
    "If the server receives `NBD_OPT_STARTTLS` when TLS has already been negotiated, it it MUST "
    "reply with `NBD_REP_ERR_INVALID`.",
)
def test_selective_second_starttls_gets_err_invalid(selective_server):
    """Once as the first option, once after the plain export was queried in clear."""
    for query_first in (False, True):
        with s.in_clear(selective_server) as client:
            if query_first:
                client.info(s.export_name(selective_server))
            _upgrade(client, selective_server)
            result = client.option(Opt.STARTTLS)
            expect_equal(result.type.name, "ERR_INVALID", "second NBD_OPT_STARTTLS")


# ------------------------------------------------------- the TLS-only export


@spec(
    SELECTIVE,
    MUST,
    "If the server receives `NBD_OPT_INFO` or `NBD_OPT_GO` and TLS has not been initiated, it "
    "MAY reply with `NBD_REP_ERR_TLS_REQD` if that export is non-existent, and MUST reply with "
    "`NBD_REP_ERR_TLS_REQD` if that export is TLS-only.",
)
def test_selective_info_and_go_on_tls_only_export_get_tls_reqd(selective_server):
    """NBD_OPT_INFO then NBD_OPT_GO on the TLS-only export, first on a bare connection, then
    after structured replies were negotiated and the plain export was queried."""
    plain = s.export_name(selective_server)
    for prepared in (False, True):
        with s.in_clear(selective_server) as client:
            if prepared:
                client.structured_reply()
                client.info(plain)
            for option in (Opt.INFO, Opt.GO):
                result = client.option(option, s.option_payload(option, TLS_ONLY))
                expect_equal(
                    result.type.name,
                    "ERR_TLS_REQD",
                    f"{option.name} on the TLS-only export before TLS",
                )


@spec(
    SELECTIVE,
    MUST,
    "If the server receives a request to enter transmission mode via `NBD_OPT_EXPORT_NAME` on a "
    "TLS-only export when TLS has not been initiated, then as this request cannot error, it MUST "
    "terminate the session.",
)
def test_selective_export_name_on_tls_only_export_terminates(selective_server):
    """As the first option, and after the plain export was queried: the session ends with no
    export information; the server goes on serving."""
    for query_first in (False, True):
        with s.in_clear(selective_server) as client:
            if query_first:
                client.info(s.export_name(selective_server))
            try:
                client.send_option(Opt.EXPORT_NAME, TLS_ONLY)
            except Disconnected:
                continue
            outcome = client.expect_disconnect(WAIT)
        expect(
            outcome.disconnected and not outcome.data,
            "NBD_OPT_EXPORT_NAME on the TLS-only export in clear",
            "the session terminated, no export information",
            f"disconnected={outcome.disconnected}, {len(outcome.data)} bytes sent",
        )
    s.assert_still_serving(selective_server, "NBD_OPT_EXPORT_NAME on a TLS-only export")


# -------------------------------------------------- NBD_REP_ERR_TLS_REQD, never elsewhere

# Options other than INFO and GO, each with the export it names: before TLS none may be
# answered NBD_REP_ERR_TLS_REQD, whatever export it names.
OTHER_OPTIONS: tuple[tuple[Opt, bytes | None], ...] = (
    (Opt.LIST, None),
    (Opt.STRUCTURED_REPLY, None),
    (Opt.LIST_META_CONTEXT, None),
    (Opt.LIST_META_CONTEXT, TLS_ONLY),
    (Opt.LIST_META_CONTEXT, UNKNOWN),
    (Opt.SET_META_CONTEXT, TLS_ONLY),
    (Opt.SET_META_CONTEXT, None),
    (Opt(0x2A), None),
    (Opt.EXTENDED_HEADERS, None),
)


@spec(
    SELECTIVE,
    MUST,
    "The server MUST NOT send `NBD_REP_ERR_TLS_REQD` in response to any option other than "
    "`NBD_OPT_INFO`, `NBD_OPT_GO` and `NBD_OPT_EXPORT_NAME`, and only in those cases in respect "
    "of a TLS-only or non-existent export.",
)
def test_selective_tls_reqd_only_for_info_and_go_on_tls_only_or_unknown(selective_server):
    """Before TLS, on one connection: NBD_OPT_LIST, the metadata-context options (naming the
    plain, the TLS-only and an unknown export), unknown options, then NBD_OPT_INFO and
    NBD_OPT_GO on the plain export: none answered NBD_REP_ERR_TLS_REQD."""
    plain = s.export_name(selective_server)
    with s.in_clear(selective_server) as client:
        for option, name in OTHER_OPTIONS:
            named = plain if name is None else name
            result = client.option(option, s.option_payload(option, named))
            _not_tls_reqd(result, f"{option.name} naming {named!r} before TLS")
        for option in (Opt.INFO, Opt.GO):
            result = client.option(option, s.option_payload(option, plain))
            _not_tls_reqd(result, f"{option.name} on the plain export before TLS")


@spec(
    SELECTIVE,
    MUST,
    "The server MUST NOT send `NBD_REP_ERR_TLS_REQD` in reply to any option if TLS has already "
    "been negotiated.",
)
def test_selective_no_tls_reqd_after_starttls(selective_server):
    """Over TLS, on one connection: every option, naming the plain, the TLS-only and an unknown
    export, then NBD_OPT_GO on the TLS-only export."""
    plain = s.export_name(selective_server)
    with s.in_clear(selective_server) as client:
        _upgrade(client, selective_server)
        for option, name in ((Opt.INFO, TLS_ONLY), (Opt.INFO, UNKNOWN), (Opt.INFO, plain)):
            _not_tls_reqd(
                client.option(option, s.option_payload(option, name)), f"INFO on {name!r}"
            )
        for option, name in OTHER_OPTIONS:
            named = plain if name is None else name
            result = client.option(option, s.option_payload(option, named))
            _not_tls_reqd(result, f"{option.name} naming {named!r} over TLS")
        _not_tls_reqd(
            client.option(Opt.GO, s.option_payload(Opt.GO, TLS_ONLY)), "GO on the TLS-only export"
        )


@spec(
    "Values / Handshake phase / Option types",
    SHOULD,
    "A SELECTIVETLS server that chooses to hide unknown exports in this manner SHOULD NOT send "
    "`NBD_REP_INFO` replies for a TLS-only export.",
)
def test_selective_server_hiding_unknown_exports_reveals_nothing_of_tls_only_ones(
    selective_server,
):
    """If an unknown export gets NBD_REP_ERR_TLS_REQD before TLS (the server hides which
    exports exist), NBD_OPT_INFO and NBD_OPT_GO on the TLS-only export carry no NBD_REP_INFO:
    otherwise the two would be told apart."""
    with s.in_clear(selective_server) as client:
        unknown = client.info(UNKNOWN)
        if unknown.type != Rep.ERR_TLS_REQD:
            unsupported(f"unknown exports are not hidden before TLS ({unknown.describe()})")
        for option in (Opt.INFO, Opt.GO):
            result = client.option(option, s.option_payload(option, TLS_ONLY))
            expect_equal(
                [r.type.name for r in result.intermediate],
                [],
                f"replies to {option.name} on the TLS-only export before {result.final.type.name}",
            )


# ------------------------------------------------------------ the mode of a connection


@spec(
    MODES,
    MUST,
    "it MUST be consistent in its mode of operation across the lifespan of a single TCP "
    "connection to the server.",
)
def test_mode_is_kept_for_the_whole_connection(selective_server):
    """The same questions, asked twice in clear on one connection (the plain export, the
    TLS-only one, an unknown one, NBD_OPT_LIST), get the same answers: being refused the
    TLS-only export does not switch the connection to FORCEDTLS, nor does anything switch it
    to NOTLS.  A connection whose answers showed NBD_REP_ERR_TLS_REQD (a TLS mode) then gets
    NBD_REP_ACK to NBD_OPT_STARTTLS."""
    plain = s.export_name(selective_server)
    questions = ((Opt.INFO, plain), (Opt.INFO, TLS_ONLY), (Opt.INFO, UNKNOWN), (Opt.LIST, b""))
    with s.in_clear(selective_server) as client:
        rounds = []
        for _ in range(2):
            answers = []
            for option, name in questions:
                result = client.option(option, s.option_payload(option, name))
                answers.append([r.type.name for r in result.replies])
            rounds.append(answers)
        for (option, name), first, second in zip(questions, *rounds, strict=True):
            expect_equal(second, first, f"second answer to {option.name} naming {name!r}")
        if any("ERR_TLS_REQD" in answer for answer in rounds[0]):
            _upgrade(client, selective_server)
            go = client.go(TLS_ONLY)
            expect_equal(go.type.name, "ACK", "NBD_OPT_GO on the TLS-only export over TLS")


@spec(
    MODES,
    MUST,
    "The server MUST operate in NOTLS mode unless the server set flag `NBD_FLAG_FIXED_NEWSTYLE` "
    "and the client replied with `NBD_FLAG_C_FIXED_NEWSTYLE` in the fixed newstyle negotiation.",
)
def test_client_without_fixed_newstyle_gets_the_plain_export(selective_server, start_server):
    """A client replying flags 0 (not fixed newstyle) cannot have TLS: it is served in NOTLS
    mode, so NBD_OPT_EXPORT_NAME on the plain export enters transmission.  A server that
    refuses such clients even without TLS is unsupported here, not wrong."""
    plain = s.export_name(selective_server)
    served, how = _export_name_without_fixed_newstyle(selective_server, plain)
    if served:
        return
    baseline, _ = _export_name_without_fixed_newstyle(start_server(ServerConfig()), plain)
    if not baseline:
        unsupported("the server does not serve clients without NBD_FLAG_C_FIXED_NEWSTYLE at all")
    expect(
        False,
        "NBD_OPT_EXPORT_NAME on the plain export from a client that is not fixed newstyle",
        "served, as the same server does without TLS (NOTLS mode)",
        how,
    )


def _export_name_without_fixed_newstyle(server: Any, name: bytes) -> tuple[bool, str]:
    """(served, what happened) for flags 0 then NBD_OPT_EXPORT_NAME NAME and a READ."""
    with s.in_clear(server, flags=0) as client:
        try:
            export = client.export_name(name).export
            reply = client.read(0, 4096)
        except (Disconnected, m.ProtocolViolation, OSError) as exc:
            return False, repr(exc)
        expect_equal(export.size, DEFAULT_SIZE, "export size after NBD_OPT_EXPORT_NAME")
        expect_equal(reply.error, Errno.OK, "READ in transmission after NBD_OPT_EXPORT_NAME")
        client.disconnect()
    return True, "served"


@spec(
    MODES,
    MUST,
    "The server MUST operate in NOTLS mode unless the server set flag `NBD_FLAG_FIXED_NEWSTYLE` "
    "and the client replied with `NBD_FLAG_C_FIXED_NEWSTYLE` in the fixed newstyle negotiation.",
)
def test_client_without_fixed_newstyle_never_gets_tls_reqd(start_server):
    """A server requiring TLS (FORCEDTLS), a client replying flags 0: NOTLS mode for it, where
    "The server MUST NOT respond to any option request with NBD_REP_ERR_TLS_REQD".  One
    connection each for NBD_OPT_LIST, NBD_OPT_INFO and NBD_OPT_GO: the server may refuse the
    option any other way, or end the session."""
    server = start_server(ServerConfig(tls=True))
    for option in (Opt.LIST, Opt.INFO, Opt.GO):
        with s.in_clear(server, flags=0) as client:
            try:
                result = client.option(option, s.option_payload(option, s.export_name(server)))
            except (Disconnected, TimeoutError):
                continue
            _not_tls_reqd(result, f"{option.name} from a client that is not fixed newstyle")


@spec(
    "Values / Handshake phase / Option types",
    MUST,
    "When this command succeeds, the server MUST NOT preserve any negotiation state (such as a "
    "request for `NBD_OPT_STRUCTURED_REPLY`, or metadata contexts from "
    "`NBD_OPT_SET_META_CONTEXT`) issued before this command.",
)
def test_selective_state_negotiated_in_clear_does_not_survive_starttls(selective_server):
    """SELECTIVETLS answers options in clear, so a client can negotiate structured replies
    and base:allocation on the plain export before STARTTLS.  After the upgrade and a GO
    that asks for neither, a READ gets a simple reply and BLOCK_STATUS is refused: nothing
    of the plaintext negotiation is in force (a FORCEDTLS server never lets it start)."""
    plain = s.export_name(selective_server)
    with s.in_clear(selective_server) as client:
        if client.structured_reply().type != Rep.ACK:
            unsupported("the server does not offer structured replies")
        client.set_meta_context(plain, (b"base:allocation",))
        _upgrade(client, selective_server)
        expect_equal(client.go(plain).type.name, "ACK", "NBD_OPT_GO on the plain export over TLS")
        reply = client.read(0, 4096)
        expect(
            reply.is_simple,
            "reply to READ after STARTTLS (structured replies asked for only in clear)",
            "a simple reply",
            [type(msg).__name__ for msg in reply.messages],
        )
        status = client.block_status(0, 4096)
        expect(
            status.error != Errno.OK,
            "BLOCK_STATUS after STARTTLS (base:allocation selected only in clear)",
            "an error (no metadata context is selected)",
            status.error.name,
        )
