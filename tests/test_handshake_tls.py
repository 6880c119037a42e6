"""NBD_OPT_STARTTLS and FORCEDTLS: what is refused before TLS, what restarts after it.

Unit tests of protocol/handshake.py, driven by tests/handshake_client.py.
"""

from __future__ import annotations

import struct

import pytest

from reference_server.protocol.constants import Option, Reply, TransmissionFlag
from reference_server.protocol.events import Close, NeedData, StartTLS
from reference_server.protocol.phases import HandshakePhase, LocalProtocolError
from tests.handshake_client import (
    Client,
    assert_still_haggling,
    info_data,
    meta_data,
    option,
    parse_replies,
)

# ---------------------------------------------------------------- STARTTLS


def test_starttls_in_notls_mode_is_policy_never_tls_reqd() -> None:
    # "NOTLS mode": reply ERR_POLICY (or UNSUP); "MUST NOT respond to any option
    # request with NBD_REP_ERR_TLS_REQD".
    c = Client()
    assert c.only(Option.STARTTLS).type == Reply.ERR_POLICY
    for number in (Option.INFO, Option.LIST, 99):
        data = info_data(b"") if number == Option.INFO else b""
        _, replies = c.opt(number, data)
        assert Reply.ERR_TLS_REQD not in [r.type for r in replies]


def test_starttls_with_data_is_invalid() -> None:
    c = Client(tls=True)
    assert c.only(Option.STARTTLS, b"x").type == Reply.ERR_INVALID


@pytest.mark.parametrize(
    ("number", "data"),
    [
        (Option.INFO, info_data(b"")),
        (Option.GO, info_data(b"")),
        (Option.LIST, b""),
        (Option.STRUCTURED_REPLY, b""),
        (Option.EXTENDED_HEADERS, b""),
        (Option.LIST_META_CONTEXT, meta_data(b"")),
        (Option.SET_META_CONTEXT, meta_data(b"", b"base:allocation")),
        (99, b""),
    ],
)
def test_forcedtls_errors_every_option_with_tls_reqd(number: int, data: bytes) -> None:
    # "FORCEDTLS mode": any other option, INFO and unsupported ones included,
    # MUST get NBD_REP_ERR_TLS_REQD, and GO MUST error with it too.
    c = Client(tls=True)
    reply = c.only(number, data)
    assert reply.type == Reply.ERR_TLS_REQD


def test_forcedtls_abort_is_still_acked() -> None:
    c = Client(tls=True)
    event, replies = c.opt(Option.ABORT)
    assert [r.type for r in replies] == [Reply.ACK]
    assert isinstance(event, Close) and event.clean


def test_forcedtls_export_name_before_tls_terminates() -> None:
    c = Client(tls=True)
    assert isinstance(c.send(option(Option.EXPORT_NAME)), Close)
    assert c.hs.data_to_send() == b""


def test_forcedtls_client_without_fixed_newstyle_is_served_in_notls_mode() -> None:
    """Not dropped at its client flags: in NOTLS mode it reaches no export (all are
    TLS-only), so its NBD_OPT_EXPORT_NAME terminates the session, and nothing earlier."""
    c = Client(tls=True, send_flags=False)
    assert isinstance(c.send(struct.pack(">I", 0)), NeedData)
    assert c.hs.data_to_send() == b""
    assert isinstance(c.send(option(Option.EXPORT_NAME)), Close)
    assert c.hs.data_to_send() == b""


def test_forcedtls_starttls_then_negotiation_restarts_from_scratch() -> None:
    c = Client(tls=True)
    # A GO smuggled in clear right behind STARTTLS must not be acted on
    # ("Protocol downgrade attacks").
    event = c.send(option(Option.STARTTLS) + option(Option.GO, info_data(b"")))
    assert isinstance(event, StartTLS)
    assert [(r.option, r.type) for r in parse_replies(c.hs.data_to_send())] == [
        (Option.STARTTLS, Reply.ACK)
    ]
    # Bytes that arrive while the TLS handshake runs are not option requests.
    assert isinstance(c.send(option(Option.GO, info_data(b""))), NeedData)
    assert c.hs.data_to_send() == b""
    c.hs.tls_established()
    assert isinstance(c.hs.next_event(), NeedData)
    assert c.hs.data_to_send() == b""
    # Over TLS: options work, TLS_REQD never appears, a second STARTTLS is invalid.
    assert c.only(Option.STARTTLS).type == Reply.ERR_INVALID
    assert_still_haggling(c)
    assert c.go().negotiated.export.name == ""


def test_forcedtls_full_negotiation_after_starttls() -> None:
    c = Client(tls=True)
    assert isinstance(c.send(option(Option.STARTTLS)), StartTLS)
    c.hs.data_to_send()
    c.hs.tls_established()
    assert c.only(Option.STRUCTURED_REPLY).type == Reply.ACK
    reply_types = [
        r.type for r in c.opt(Option.SET_META_CONTEXT, meta_data(b"", b"base:allocation"))[1]
    ]
    assert reply_types == [Reply.META_CONTEXT, Reply.ACK]
    negotiated = c.go().negotiated
    assert negotiated.structured_replies
    assert list(negotiated.meta_contexts.values()) == ["base:allocation"]


def test_tls_established_resets_state_negotiated_before() -> None:
    # Negotiating structured replies in clear is impossible in FORCEDTLS (the
    # option gets ERR_TLS_REQD); exercise the reset directly, as if a bug had
    # let the option take effect: state set, STARTTLS, then tls_established.
    c = Client(tls=True)
    c.hs._structured = True
    assert isinstance(c.send(option(Option.STARTTLS)), StartTLS)
    c.hs.data_to_send()
    c.hs.tls_established()
    negotiated = c.go().negotiated
    assert not negotiated.structured_replies
    assert not negotiated.flags & TransmissionFlag.SEND_DF


def test_tls_established_without_starttls_is_a_local_error() -> None:
    # The transport may report TLS only after StartTLS: anything else is a bug
    # in the caller, not the client, and the phase does not change.
    c = Client()
    with pytest.raises(LocalProtocolError, match="TLS_ESTABLISHED is not allowed in HAGGLING"):
        c.hs.tls_established()
    assert c.hs.phase is HandshakePhase.HAGGLING
    assert_still_haggling(c)
