"""Unit tests of the TLS modes (protocol/tls_policy.py) as the handshake applies them.

"TLS support / Server-side requirements": NOTLS, FORCEDTLS and SELECTIVETLS,
driven through the sans-IO Handshake with bytes built here from the spec
(as tests/test_handshake.py does), no sockets.  The SELECTIVETLS server has a
plain export ("plain") and a TLS-only one ("secret").
"""

from __future__ import annotations

import struct

import pytest

from reference_server.protocol.constants import ClientFlag, Info, Option, Reply
from reference_server.protocol.events import Close, EnterTransmission, Event, NeedData, StartTLS
from reference_server.protocol.export import ExportInfo
from reference_server.protocol.handshake import Handshake
from reference_server.protocol.tls_policy import TLSMode, TLSPolicy, server_mode

IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
FIXED = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
PLAIN = ExportInfo("plain", 1 << 20, tls_only=False)
SECRET = ExportInfo("secret", 1 << 20, tls_only=True)


def option(number: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, number, len(data)) + data


def named(name: bytes) -> bytes:
    """NBD_OPT_INFO/GO data asking for NBD_INFO_BLOCK_SIZE."""
    return struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, Info.BLOCK_SIZE)


def meta(name: bytes) -> bytes:
    query = b"base:allocation"
    return struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(query)) + query


def replies(data: bytes) -> list[tuple[int, bytes]]:
    """(reply type, data) of each option reply in DATA."""
    found, pos = [], 0
    while pos < len(data):
        magic, _, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == REPLY_MAGIC
        found.append((rtype, data[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return found


class Session:
    """One connection's handshake, the client flags sent."""

    def __init__(self, *exports: ExportInfo, tls: bool = True, flags: int = FIXED) -> None:
        self.hs = Handshake({e.name: e for e in exports}, tls_available=tls)
        self.hs.data_to_send()  # the greeting
        self.event = self.send(struct.pack(">I", flags))

    def send(self, data: bytes) -> Event:
        self.hs.receive_data(data)
        return self.hs.next_event()

    def ask(self, number: int, data: bytes = b"") -> list[int]:
        """Send an option that keeps haggling going; the types of its replies."""
        self.event = self.send(option(number, data))
        assert isinstance(self.event, NeedData | EnterTransmission | StartTLS), self.event
        return [rtype for rtype, _ in replies(self.hs.data_to_send())]

    def listed(self) -> list[bytes]:
        self.send(option(Option.LIST))
        return [
            body[4:] for rtype, body in replies(self.hs.data_to_send()) if rtype == Reply.SERVER
        ]

    def upgrade(self) -> None:
        assert self.ask(Option.STARTTLS) == [Reply.ACK]
        assert isinstance(self.event, StartTLS)
        self.hs.tls_established()


def test_the_mode_follows_the_credentials_and_the_exports() -> None:
    assert server_mode(False, [SECRET]) is TLSMode.NOTLS
    assert server_mode(True, [SECRET]) is TLSMode.FORCEDTLS
    assert server_mode(True, [SECRET, PLAIN]) is TLSMode.SELECTIVETLS
    assert server_mode(True, [PLAIN]) is TLSMode.SELECTIVETLS  # TLS optional everywhere
    assert ExportInfo("default", 1).tls_only  # --tls-creds alone stays FORCEDTLS


def test_selective_before_tls_serves_the_plain_export_only() -> None:
    c = Session(PLAIN, SECRET)
    assert c.listed() == [b"plain"]  # "MAY omit exports that are TLS-only from NBD_OPT_LIST"
    assert c.ask(Option.INFO, named(b"plain"))[-1] == Reply.ACK
    # TLS-only and unknown alike: NBD_REP_ERR_TLS_REQD and no NBD_REP_INFO before it.
    for name in (b"secret", b"missing"):
        for number in (Option.INFO, Option.GO):
            assert c.ask(number, named(name)) == [Reply.ERR_TLS_REQD]
    # NBD_REP_ERR_TLS_REQD is for INFO, GO and EXPORT_NAME only.
    assert c.ask(Option.STRUCTURED_REPLY) == [Reply.ACK]
    assert c.ask(Option.LIST_META_CONTEXT, meta(b"secret")) == [Reply.ERR_UNKNOWN]
    assert c.ask(Option.SET_META_CONTEXT, meta(b"secret")) == [Reply.ERR_UNKNOWN]
    assert c.ask(Option.SET_META_CONTEXT, meta(b"plain")) == [Reply.META_CONTEXT, Reply.ACK]
    assert c.ask(0x2A) == [Reply.ERR_UNSUP]
    assert c.ask(Option.GO, named(b"plain"))[-1] == Reply.ACK
    assert isinstance(c.event, EnterTransmission)
    assert c.event.negotiated.export is PLAIN


@pytest.mark.parametrize(("name", "served"), [(b"plain", True), (b"secret", False)])
def test_selective_export_name_before_tls(name: bytes, served: bool) -> None:
    c = Session(PLAIN, SECRET)
    event = c.send(option(Option.EXPORT_NAME, name))
    assert isinstance(event, EnterTransmission if served else Close)
    assert bool(c.hs.data_to_send()) is served


def test_selective_after_tls_serves_everything_and_never_says_tls_reqd() -> None:
    c = Session(PLAIN, SECRET)
    assert c.ask(Option.INFO, named(b"secret")) == [Reply.ERR_TLS_REQD]
    c.upgrade()
    assert c.listed() == [b"plain", b"secret"]
    assert c.ask(Option.INFO, named(b"missing")) == [Reply.ERR_UNKNOWN]
    assert c.ask(Option.STARTTLS) == [Reply.ERR_INVALID]
    assert c.ask(Option.GO, named(b"secret"))[-1] == Reply.ACK
    assert isinstance(c.event, EnterTransmission)


def test_selective_client_without_fixed_newstyle_is_served_in_notls_mode() -> None:
    """ "MUST operate in NOTLS mode unless ... NBD_FLAG_C_FIXED_NEWSTYLE": no TLS, so the
    TLS-only export is out of reach and nothing is answered NBD_REP_ERR_TLS_REQD."""
    c = Session(PLAIN, SECRET, flags=0)
    assert isinstance(c.event, NeedData)
    assert c.ask(Option.STARTTLS) == [Reply.ERR_POLICY]
    assert c.listed() == [b"plain"]
    assert c.ask(Option.INFO, named(b"secret")) == [Reply.ERR_UNKNOWN]
    assert isinstance(c.send(option(Option.EXPORT_NAME, b"secret")), Close)
    c = Session(PLAIN, SECRET, flags=0)
    assert isinstance(c.send(option(Option.EXPORT_NAME, b"plain")), EnterTransmission)


def test_forced_serves_a_client_without_fixed_newstyle_in_notls_mode() -> None:
    """FORCEDTLS has nothing for it (every export is TLS-only), but does not drop it at its
    client flags: options are answered as in NOTLS mode, never NBD_REP_ERR_TLS_REQD, and
    NBD_OPT_EXPORT_NAME terminates the session."""
    c = Session(SECRET, flags=0)
    assert isinstance(c.event, NeedData)
    assert c.ask(Option.STARTTLS) == [Reply.ERR_POLICY]
    assert c.listed() == []
    assert c.ask(Option.INFO, named(b"secret")) == [Reply.ERR_UNKNOWN]
    assert isinstance(c.send(option(Option.EXPORT_NAME, b"secret")), Close)


def test_notls_serves_tls_only_exports_in_clear() -> None:
    """Without credentials the flag means nothing: every export is served."""
    c = Session(SECRET, tls=False)
    assert c.ask(Option.STARTTLS) == [Reply.ERR_POLICY]
    assert c.listed() == [b"secret"]
    assert c.ask(Option.GO, named(b"secret"))[-1] == Reply.ACK


def test_the_connection_mode_is_settled_by_the_client_flags() -> None:
    policy = TLSPolicy(TLSMode.SELECTIVETLS)
    policy.client_flags(fixed_newstyle=True)
    assert policy.mode is TLSMode.SELECTIVETLS
    for mode in (TLSMode.SELECTIVETLS, TLSMode.FORCEDTLS):
        fallback = TLSPolicy(mode)
        fallback.client_flags(fixed_newstyle=False)
        assert fallback.mode is TLSMode.NOTLS
        assert not fallback.usable(SECRET) and fallback.usable(PLAIN)
