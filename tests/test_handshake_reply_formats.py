"""NBD_OPT_STRUCTURED_REPLY and NBD_OPT_EXTENDED_HEADERS: the reply format negotiated.

Unit tests of protocol/handshake.py, driven by tests/handshake_client.py.
"""

from __future__ import annotations

from reference_server.protocol.constants import Option, Reply, TransmissionFlag
from tests.handshake_client import Client

# -------------------------------------------------------- STRUCTURED_REPLY


def test_structured_reply_is_acked_and_enables_df() -> None:
    c = Client()
    assert c.only(Option.STRUCTURED_REPLY).type == Reply.ACK
    negotiated = c.go().negotiated
    assert negotiated.structured_replies and not negotiated.extended_headers
    assert negotiated.flags & TransmissionFlag.SEND_DF


def test_structured_reply_with_data_is_invalid_and_not_negotiated() -> None:
    c = Client()
    assert c.only(Option.STRUCTURED_REPLY, b"\x00").type == Reply.ERR_INVALID
    assert not c.go().negotiated.structured_replies


def test_structured_reply_after_extended_headers_is_ext_header_reqd() -> None:
    c = Client()
    assert c.only(Option.EXTENDED_HEADERS).type == Reply.ACK
    assert c.only(Option.STRUCTURED_REPLY).type == Reply.ERR_EXT_HEADER_REQD
    negotiated = c.go().negotiated
    assert negotiated.extended_headers and negotiated.structured_replies


# -------------------------------------------------------- EXTENDED_HEADERS


def test_extended_headers_after_structured_reply_take_precedence() -> None:
    c = Client()
    assert c.only(Option.STRUCTURED_REPLY).type == Reply.ACK
    assert c.only(Option.EXTENDED_HEADERS).type == Reply.ACK
    negotiated = c.go().negotiated
    assert negotiated.extended_headers
    assert negotiated.flags & TransmissionFlag.SEND_DF


def test_extended_headers_with_data_is_invalid_and_not_negotiated() -> None:
    c = Client()
    assert c.only(Option.EXTENDED_HEADERS, b"\x00\x00").type == Reply.ERR_INVALID
    assert not c.go().negotiated.extended_headers
