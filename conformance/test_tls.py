"""TLS with a server that requires it (FORCEDTLS): what is answered before STARTTLS, the upgrade.

Raw-wire checks (conformance.wire): libnbd 1.14 cannot send NBD_OPT_STARTTLS on
its own, nor options in clear to a TLS server.  Credentials come from
conformance.tlsutil through the profile's TLS configuration.
"""

from __future__ import annotations

import contextlib
import ssl
import warnings

import pytest

from conformance.servers.base import ServerConfig
from conformance.spec import MUST, SHOULD, expect, expect_equal, spec, unsupported
from conformance.wire import Disconnected, Errno, Opt, Rep
from conformance.wire import messages as m
from conformance.wire import session as s
from conformance.wire.constants import OPTION_REPLY_MAGIC

WAIT = 5.0
# A plaintext reply to an injected option would come at once; waiting longer buys nothing.
REPLY_WAIT = 2.0
CLEAR_OPTIONS = [
    Opt.LIST,
    Opt.INFO,
    Opt.GO,
    Opt.STRUCTURED_REPLY,
    Opt.LIST_META_CONTEXT,
    Opt.SET_META_CONTEXT,
    Opt.EXTENDED_HEADERS,
    Opt(0x2A),
]


@pytest.fixture
def tls_server(start_server):
    return start_server(ServerConfig(tls=True))


def _plaintext_reply_in(data: bytes) -> bool:
    return OPTION_REPLY_MAGIC.to_bytes(8, "big") in data


FORCED_TLS_RULE = (
    "If the server receives any other option, including `NBD_OPT_INFO` and unsupported options, "
    "it MUST reply with `NBD_REP_ERR_TLS_REQD` if TLS has not been initiated; `NBD_OPT_INFO` is "
    "included as in this mode, all exports are TLS-only."
)


@spec("TLS support / Server-side requirements / FORCEDTLS mode", MUST, FORCED_TLS_RULE)
@pytest.mark.parametrize("option", CLEAR_OPTIONS, ids=lambda o: o.name.lower())
def test_option_before_starttls_gets_tls_reqd(tls_server, option):
    with s.in_clear(tls_server) as client:
        result = client.option(option, s.option_payload(option, s.export_name(tls_server)))
        expect_equal(result.type.name, "ERR_TLS_REQD", f"{option.name} before STARTTLS")


@spec(
    "Values / Handshake phase / Option types",
    MUST,
    "In this case, a FORCEDTLS server MUST NOT send `NBD_REP_INFO` replies, but a SELECTIVETLS "
    "server MAY do so if this is a TLS-only export.",
)
@pytest.mark.parametrize("option", [Opt.INFO, Opt.GO], ids=lambda o: o.name.lower())
def test_info_and_go_before_starttls_reveal_nothing(tls_server, option):
    with s.in_clear(tls_server) as client:
        result = client.option(option, s.option_payload(option, s.export_name(tls_server)))
        expect_equal([r.type.name for r in result.intermediate], [], f"{option.name} replies")


@spec(
    "TLS support / Server-side requirements / FORCEDTLS mode",
    MUST,
    "If the server receives a request to enter transmission mode via `NBD_OPT_EXPORT_NAME` when "
    "TLS has not been initiated, then as this request cannot error, it MUST terminate the session.",
)
def test_export_name_before_starttls_terminates(tls_server):
    with s.in_clear(tls_server) as client:
        try:
            client.send_option(Opt.EXPORT_NAME, s.export_name(tls_server))
        except Disconnected:
            return
        outcome = client.expect_disconnect(WAIT)
    expect(
        outcome.disconnected and not outcome.data,
        "NBD_OPT_EXPORT_NAME in clear",
        "the session terminated, no export information",
        f"disconnected={outcome.disconnected}, {len(outcome.data)} bytes sent",
    )
    s.assert_still_serving(tls_server, "NBD_OPT_EXPORT_NAME before STARTTLS")


@spec(
    "TLS support / Server-side requirements / FORCEDTLS mode",
    MUST,
    "If the server receives `NBD_OPT_STARTTLS` prior to negotiating TLS, it MUST reply with "
    "`NBD_REP_ACK`.",
)
def test_starttls_gets_ack_then_tls(tls_server):
    with s.in_clear(tls_server) as client:
        result = client.option(Opt.STARTTLS)
        expect_equal(result.type.name, "ACK", "reply to NBD_OPT_STARTTLS")
        client.upgrade_tls(s.require_tls_context(tls_server))
        go = client.go(s.export_name(tls_server))
        expect_equal(go.type.name, "ACK", "NBD_OPT_GO over TLS")
        expect_equal(client.read(0, 4096).error, Errno.OK, "READ over TLS")
        client.disconnect()


@spec(
    "TLS support / Server-side requirements / FORCEDTLS mode",
    MUST,
    "If the server receives `NBD_OPT_STARTTLS` when TLS has already been negotiated, it it MUST "
    "reply with `NBD_REP_ERR_INVALID`.",
)
def test_second_starttls_gets_err_invalid(tls_server):
    client = s.negotiated(tls_server)
    try:
        result = client.option(Opt.STARTTLS)
        expect_equal(result.type.name, "ERR_INVALID", "second NBD_OPT_STARTTLS")
    finally:
        client.close()


@spec(
    "TLS support / Server-side requirements / FORCEDTLS mode",
    MUST,
    "The server MUST NOT send `NBD_REP_ERR_TLS_REQD` in reply to any option if TLS has already "
    "been initiated.",
)
@pytest.mark.parametrize("option", [Opt.LIST, Opt.INFO, Opt(0x2A)], ids=lambda o: o.name.lower())
def test_no_tls_reqd_after_starttls(tls_server, option):
    client = s.negotiated(tls_server)
    try:
        result = client.option(option, s.option_payload(option, b"conformance-no-such-export"))
        expect(
            result.type != Rep.ERR_TLS_REQD,
            f"{option.name} over TLS",
            "anything but ERR_TLS_REQD",
            result.type.name,
        )
    finally:
        client.close()


@spec(
    "TLS support / Server-side requirements / FORCEDTLS mode",
    MUST,
    "If the handshake is unsuccessful (for instance the client's certificate does not match) the "
    "server MUST terminate the session as by this stage it is too late to continue without TLS "
    "as the acknowledgement has been sent.",
)
def test_failed_tls_handshake_terminates_session(tls_server):
    with s.in_clear(tls_server) as client:
        expect_equal(client.option(Opt.STARTTLS).type.name, "ACK", "reply to NBD_OPT_STARTTLS")
        try:
            client.send(m.pack_option(Opt.LIST) * 4)  # plaintext where a ClientHello belongs
        except Disconnected:
            return
        outcome = client.expect_disconnect(WAIT)
    expect(
        not _plaintext_reply_in(outcome.data),
        "after a failed TLS handshake",
        "no plaintext option reply",
        outcome.data[:40].hex(),
    )
    expect(
        outcome.disconnected,
        "after a failed TLS handshake",
        "the session terminated",
        f"still open after {WAIT}s",
    )
    s.assert_still_serving(tls_server, "a failed TLS handshake")


@spec(
    "TLS support / Server-side requirements / FORCEDTLS mode",
    MUST,
    "After an `NBD_REP_ACK` reply has been sent, the server MUST be prepared for a TLS handshake, "
    "and all further data MUST be sent and received over TLS.",
)
def test_option_sent_with_starttls_is_not_answered_in_clear(tls_server):
    """STARTTLS and NBD_OPT_LIST in one write: the LIST bytes, buffered by the server before the
    upgrade, must never be acted on in clear (the STARTTLS command-injection class)."""
    with s.in_clear(tls_server) as client:
        client.send(m.pack_option(Opt.STARTTLS) + m.pack_option(Opt.LIST))
        ack = client.recv_option_reply()
        expect_equal(ack.type.name, "ACK", "reply to NBD_OPT_STARTTLS")
        outcome = client.expect_disconnect(REPLY_WAIT)
    expect(
        not _plaintext_reply_in(outcome.data),
        "bytes after the ACK",
        "no plaintext reply to the buffered NBD_OPT_LIST",
        outcome.data[:40].hex(),
    )
    s.assert_still_serving(tls_server, "an option injected behind NBD_OPT_STARTTLS")


@spec(
    "TLS support / Security considerations / TLS versions",
    MUST,
    "NBD implementations supporting TLS MUST support TLS version 1.2, SHOULD support any later "
    "versions.",
)
def test_tls_1_2_is_supported(tls_server):
    ctx = s.require_tls_context(tls_server)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with s.in_clear(tls_server) as client:
        expect_equal(client.option(Opt.STARTTLS).type.name, "ACK", "reply to NBD_OPT_STARTTLS")
        try:
            client.upgrade_tls(ctx)
        except (ssl.SSLError, OSError) as exc:
            expect(False, "TLS 1.2 handshake", "success", repr(exc))
        expect_equal(client.sock.version(), "TLSv1.2", "negotiated TLS version")
        expect_equal(client.go(s.export_name(tls_server)).type.name, "ACK", "GO over TLS 1.2")


# ------------------------------------------------------------------ NOTLS mode

NOTLS = "TLS support / Server-side requirements / NOTLS mode"


@contextlib.contextmanager
def notls(server):
    """Option haggling with a server the suite runs without TLS (NOTLS mode is baseline)."""
    if s.tls_context(server) is not None:
        pytest.skip("the server under test requires TLS; NOTLS mode is checked without it")
    with s.in_clear(server) as client:
        yield client


@spec(
    NOTLS,
    MUST,
    "If the server receives `NBD_OPT_STARTTLS` it MUST respond with `NBD_REP_ERR_POLICY` (if it "
    "does not support TLS for policy reasons), `NBD_REP_ERR_UNSUP` (if it does not support the "
    "`NBD_OPT_STARTTLS` option at all) or another error explicitly permitted by this document.",
)
def test_starttls_without_tls_gets_policy_or_unsup(server):
    """A server started without TLS credentials refuses STARTTLS, and haggling goes on in
    clear: NBD_OPT_GO still succeeds."""
    with notls(server) as client:
        result = client.option(Opt.STARTTLS)
        expect(
            result.type in (Rep.ERR_POLICY, Rep.ERR_UNSUP),
            "reply to NBD_OPT_STARTTLS in NOTLS mode",
            "NBD_REP_ERR_POLICY or NBD_REP_ERR_UNSUP",
            result.describe(),
        )
        go = client.go(s.export_name(server))
        expect_equal(go.type.name, "ACK", "NBD_OPT_GO after a refused STARTTLS")


@spec(NOTLS, MUST, "The server MUST NOT respond to any option request with `NBD_REP_ERR_TLS_REQD`.")
def test_notls_server_never_answers_tls_reqd(server):
    """Every option, known or not (and STARTTLS), on one connection: no NBD_REP_ERR_TLS_REQD."""
    with notls(server) as client:
        name = s.export_name(server)
        for option in (Opt.STARTTLS, *CLEAR_OPTIONS):
            if option == Opt.GO:
                continue  # last: it ends option haggling
            result = client.option(option, s.option_payload(option, name))
            expect(
                result.type != Rep.ERR_TLS_REQD,
                f"reply to {option.name} in NOTLS mode",
                "anything but NBD_REP_ERR_TLS_REQD",
                result.describe(),
            )
        result = client.option(Opt.GO, s.option_payload(Opt.GO, name))
        expect_equal(result.type.name, "ACK", "reply to NBD_OPT_GO in NOTLS mode")


# ------------------------------------------------------------- TLS versions


def _handshake_with(server, low: ssl.TLSVersion, high: ssl.TLSVersion):
    """STARTTLS, then a TLS handshake limited to [LOW, HIGH]: the version, or the error."""
    ctx = s.require_tls_context(server)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 and 1.1, on purpose
            ctx.minimum_version, ctx.maximum_version = low, high
        if low < ssl.TLSVersion.TLSv1_2:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as exc:
        unsupported(f"this client's TLS library cannot offer {low.name}-{high.name}: {exc}")
    with s.in_clear(server) as client:
        expect_equal(client.option(Opt.STARTTLS).type.name, "ACK", "reply to NBD_OPT_STARTTLS")
        try:
            client.upgrade_tls(ctx)
        except (ssl.SSLError, OSError) as exc:
            if "NO_PROTOCOLS_AVAILABLE" in str(exc) or "UNSUPPORTED_PROTOCOL" in str(exc):
                unsupported(f"this client's TLS library refuses {low.name}-{high.name}: {exc}")
            return None, exc
        assert isinstance(client.sock, ssl.SSLSocket), "upgrade_tls() left a plain socket"
        return client.sock.version(), None


@spec(
    "TLS support / Security considerations / TLS versions",
    SHOULD,
    "SHOULD support any later versions.",
)
def test_tls_1_3_is_supported(tls_server):
    if not ssl.HAS_TLSv1_3:
        unsupported("this client's TLS library has no TLS 1.3")
    version, error = _handshake_with(tls_server, ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3)
    expect_equal(version, "TLSv1.3", f"TLS 1.3 handshake ({error!r})")


@spec(
    "TLS support / Security considerations / TLS versions",
    SHOULD,
    "SHOULD NOT do so by default (i.e. they SHOULD only be available by a configuration change).",
)
def test_tls_before_1_2_is_refused_by_default(tls_server):
    """A client offering only TLS 1.0 or 1.1 is refused by a server in its default setup."""
    version, _ = _handshake_with(tls_server, ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
    expect(version is None, "TLS handshake offering only TLS 1.0 and 1.1", "refused", version)


# ------------------------------------------- hard disconnects over TLS: close_notify


def _close_after(server, stage: str):
    """Over TLS, send a message with a bad magic at STAGE; how the server ends the session."""
    ctx = s.require_tls_context(server)
    with s.in_clear(server) as client:
        expect_equal(client.starttls(ctx).type.name, "ACK", "reply to NBD_OPT_STARTTLS")
        if stage == "transmission":
            expect_equal(client.go(s.export_name(server)).type.name, "ACK", "NBD_OPT_GO")
            client.send(m.REQUEST.pack(0xBADC0DE5, 0, 0, 0xFEDCBA9876543210, 0, 512))
        else:
            client.send(m.pack_option(Opt.LIST, magic=0x0BADC0DE0BADC0DE))
        how, _ = s.wait_for_close(client, WAIT)
    if how == "open":
        unsupported(f"the server did not end the session after a bad magic ({stage})")
    return how


@spec(
    "Protocol phases / Handshake / Termination of the session during option haggling",
    SHOULD,
    "If TLS is negotiated, the party initiating the transaction SHOULD shutdown TLS first if it "
    "is running.",
)
def test_hard_disconnect_in_handshake_sends_close_notify(tls_server):
    """An option with a bad magic after STARTTLS: if the server drops the connection (it MAY),
    it shuts TLS down first (close_notify)."""
    how = _close_after(tls_server, "handshake")
    expect(how != "no close_notify", "the end of the session", "close_notify, then TCP close", how)


@spec(
    "Protocol phases / Transmission / Terminating the transmission phase",
    SHOULD,
    "The client or the server drops the TCP session (in which case it SHOULD shut down the TLS "
    "session first).",
)
def test_hard_disconnect_in_transmission_sends_close_notify(tls_server):
    """A request with a bad magic over TLS: if the server drops the connection (it MAY), it
    shuts TLS down first (close_notify)."""
    how = _close_after(tls_server, "transmission")
    expect(how != "no close_notify", "the end of the session", "close_notify, then TCP close", how)


@spec(
    "Values / Handshake phase / Option types",
    MUST,
    "The server MUST either reply with `NBD_REP_ACK` after which point the connection is upgraded "
    "to TLS, or an error reply explicitly permitted by this document (for example, "
    "`NBD_REP_ERR_INVALID` if the client included data).",
)
def test_starttls_with_data_gets_ack_then_tls_or_a_permitted_error(tls_server):
    """NBD_OPT_STARTTLS carrying data: NBD_REP_ACK followed by a working TLS handshake, or an
    error the spec permits (NBD_REP_ERR_INVALID, as the example says).  After the error the
    server MAY drop the connection: the client broke a MUST by sending data."""
    ctx = s.require_tls_context(tls_server)
    with s.in_clear(tls_server) as client:
        result = client.option(Opt.STARTTLS, b"junk")
        if not result.ok:
            expect(
                result.type in (Rep.ERR_INVALID, Rep.ERR_POLICY, Rep.ERR_UNSUP),
                "reply to NBD_OPT_STARTTLS with data",
                "NBD_REP_ACK or NBD_REP_ERR_INVALID (or ERR_POLICY, ERR_UNSUP)",
                result.describe(),
            )
            return
        try:
            client.upgrade_tls(ctx)
        except (ssl.SSLError, OSError) as exc:
            expect(False, "TLS after NBD_REP_ACK to STARTTLS with data", "a TLS session", exc)
        go = client.go(s.export_name(tls_server))
        expect_equal(go.type.name, "ACK", "NBD_OPT_GO over TLS")
