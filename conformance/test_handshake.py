"""Handshake: greeting magics, handshake and client flags, NO_ZEROES.

Raw-wire checks (conformance.wire): libnbd cannot send unknown client flags,
skip NO_ZEROES, or show the bytes between the handshake and the first reply.
"""

from __future__ import annotations

import pytest

from conformance.spec import MUST, SHOULD, expect, expect_equal, spec, unsupported
from conformance.wire import (
    ClientFlag,
    Cmd,
    Disconnected,
    Errno,
    HandshakeFlag,
    Opt,
    TransmissionFlag,
)
from conformance.wire import messages as m
from conformance.wire import session as s
from conformance.wire.constants import CLISERV_MAGIC, IHAVEOPT, NBDMAGIC, SIMPLE_REPLY_MAGIC

DISCONNECT_TIMEOUT = 5.0


def _greeting(server):
    with s.connect(server) as client:
        return client.read_greeting()


@spec("Protocol phases / Handshake / Newstyle negotiation", MUST)
def test_greeting_starts_with_nbdmagic(server):
    expect_equal(hex(_greeting(server).magic), hex(NBDMAGIC), "first 64 bits of the greeting")


@spec("Protocol phases / Handshake / Newstyle negotiation", MUST)
def test_greeting_second_magic_is_ihaveopt(server):
    expect_equal(hex(_greeting(server).option_magic), hex(IHAVEOPT), "second greeting magic")


@spec("Values / Handshake phase / Flag fields / Handshake flags", MUST)
def test_server_sets_fixed_newstyle(server):
    """bit 0 "MUST be set by servers that support the fixed newstyle protocol"."""
    flags = _greeting(server).flags
    expect(flags & HandshakeFlag.FIXED_NEWSTYLE, "NBD_FLAG_FIXED_NEWSTYLE", True, repr(flags))


@spec(
    "Values / Handshake phase / Flag fields / Handshake flags",
    MUST,
    "The server MUST NOT set any other flags, and SHOULD NOT change behaviour unless the client "
    "responds with a corresponding flag.",
)
def test_server_sets_no_unknown_handshake_flags(server):
    flags = int(_greeting(server).flags)
    known = int(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
    expect_equal(hex(flags & ~known), hex(0), "undefined handshake flag bits")


def _reaction_to_client_flags(server, flags: int):
    """Send *flags*, then NBD_OPT_LIST; return (disconnected, what happened)."""
    client = s.connect(server)
    try:
        client.read_greeting()
        client.send_client_flags(flags)
        try:
            client.send_option(Opt.LIST)
        except Disconnected:
            return True, "closed"
        outcome = client.expect_disconnect(DISCONNECT_TIMEOUT, stop_on_data=True)
        if outcome.disconnected and not outcome.data:
            return True, "closed"
        if outcome.data:
            return outcome.disconnected, f"{len(outcome.data)} bytes of reply to NBD_OPT_LIST"
        return False, f"connection still open after {DISCONNECT_TIMEOUT}s"
    finally:
        client.close()


@spec(
    "Values / Handshake phase / Flag fields / Client flags",
    MUST,
    "Clients MUST NOT set any other flags; the server MUST drop the TCP connection if the client "
    "sets an unknown flag, or a flag that does not match something advertised by the server.",
)
@pytest.mark.parametrize("bit", [2, 15, 31])
def test_unknown_client_flag_drops_connection(server, bit):
    flags = ClientFlag.C_FIXED_NEWSTYLE | (1 << bit)
    dropped, what = _reaction_to_client_flags(server, int(flags))
    expect(
        dropped and what == "closed", f"client flags {int(flags):#x}", "connection dropped", what
    )
    s.assert_still_serving(server, f"unknown client flag bit {bit}")


@spec(
    "Values / Handshake phase / Flag fields / Client flags",
    MUST,
    "Clients MUST NOT set any other flags; the server MUST drop the TCP connection if the client "
    "sets an unknown flag, or a flag that does not match something advertised by the server.",
)
def test_no_zeroes_not_advertised_drops_connection(server):
    if _greeting(server).flags & HandshakeFlag.NO_ZEROES:
        unsupported("the server advertises NBD_FLAG_NO_ZEROES, so C_NO_ZEROES matches it")
    flags = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
    dropped, what = _reaction_to_client_flags(server, flags)
    expect(dropped and what == "closed", "unadvertised C_NO_ZEROES", "connection dropped", what)


def _next_reply_magic_after_export_name(server, client_flags: int) -> tuple[bytes, bytes]:
    """EXPORT_NAME, then a READ: return (bytes after the 10-byte export info, reply magic)."""
    client = s.connect(server)
    try:
        greeting = client.read_greeting()
        if client_flags & ClientFlag.C_NO_ZEROES and not greeting.flags & HandshakeFlag.NO_ZEROES:
            unsupported("the server does not advertise NBD_FLAG_NO_ZEROES")
        if s.tls_context(server) is not None:
            unsupported("NBD_OPT_EXPORT_NAME after STARTTLS is checked in test_tls")
        client.send_client_flags(client_flags)
        client.send_option(Opt.EXPORT_NAME, s.export_name(server))
        client.recv_exactly(10, "export size and transmission flags")
        zeroes = b""
        if not client_flags & ClientFlag.C_NO_ZEROES:
            zeroes = client.recv_exactly(124, "124 reserved zeroes")
        client.send_request(Cmd.READ, 0, 512, cookie=0x1234)
        magic = client.recv_exactly(4, "reply magic")
        _finish_simple_read(client, magic)
        return zeroes, magic
    finally:
        client.close()


def _finish_simple_read(client, magic: bytes) -> None:
    """Read the rest of a 512-byte READ's simple reply, then NBD_CMD_DISC: a check leaves
    like a polite client, never with a reply still in flight (nbdkit 1.32 aborts when a
    client closes while it is sending)."""
    if magic != SIMPLE_REPLY_MAGIC.to_bytes(4, "big"):
        return  # framing lost: the check fails on the magic, nothing more to read
    error = int.from_bytes(client.recv_exactly(12, "rest of the simple reply")[:4], "big")
    if not error:
        client.recv_exactly(512, "READ data")
    client.disconnect()


@spec(
    "Values / Handshake phase / Flag fields / Client flags",
    MUST,
    "If set, the server MUST NOT send the 124 bytes of zeroes when the client ends negotiation "
    "with `NBD_OPT_EXPORT_NAME`.",
)
def test_no_zeroes_omits_zeroes_after_export_name(server):
    flags = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
    _, magic = _next_reply_magic_after_export_name(server, flags)
    expect_equal(
        magic.hex(),
        SIMPLE_REPLY_MAGIC.to_bytes(4, "big").hex(),
        "first bytes after the 10-byte export info (then a reply)",
    )


@spec("Protocol phases / Handshake / Newstyle negotiation", MUST)
def test_export_name_sends_124_zeroes_without_no_zeroes(server):
    """ "S: 124 bytes, zeroes (reserved) (unless `NBD_FLAG_C_NO_ZEROES` was negotiated ...)"."""
    zeroes, magic = _next_reply_magic_after_export_name(server, int(ClientFlag.C_FIXED_NEWSTYLE))
    expect_equal(zeroes, bytes(124), "124 bytes after the export info")
    expect_equal(magic.hex(), SIMPLE_REPLY_MAGIC.to_bytes(4, "big").hex(), "next reply magic")


@spec(
    "Values / Handshake phase / Option types",
    MUST,
    "The server MUST NOT send any zero padding bytes after the `NBD_REP_ACK` data, whether or "
    "not the client negotiated the `NBD_FLAG_C_NO_ZEROES` flag.",
)
def test_go_sends_no_zero_padding(server):
    client = s.negotiated(server, flags=int(ClientFlag.C_FIXED_NEWSTYLE))
    try:
        result = client.go(s.export_name(server))
        expect(result.ok, "NBD_OPT_GO", "NBD_REP_ACK", result.describe())
        client.send_request(Cmd.READ, 0, 512, cookie=0x77)
        magic = client.recv_exactly(4, "reply magic")
        _finish_simple_read(client, magic)
        expect_equal(
            magic.hex(),
            SIMPLE_REPLY_MAGIC.to_bytes(4, "big").hex(),
            "first bytes after NBD_REP_ACK (then a reply)",
        )
    finally:
        client.close()


@spec(
    "Values / Handshake phase / Flag fields / Transmission flags",
    MUST,
    "- bit 0, `NBD_FLAG_HAS_FLAGS`: MUST always be 1.",
)
@pytest.mark.parametrize("path", ["export_name", "go"])
def test_transmission_flags_have_has_flags(server, path):
    client = s.negotiated(server)
    try:
        if path == "go":
            export = client.go(s.export_name(server)).export
            expect(export is not None, "NBD_INFO_EXPORT in the reply to NBD_OPT_GO")
            assert export is not None
            flags = export.flags
        else:
            if s.tls_context(server) is not None:
                unsupported("NBD_OPT_EXPORT_NAME after STARTTLS is checked in test_tls")
            flags = client.export_name(s.export_name(server)).export.flags
        expect(flags & TransmissionFlag.HAS_FLAGS, "NBD_FLAG_HAS_FLAGS", True, repr(flags))
    finally:
        client.close()


@pytest.mark.disruptive  # malformed framing: a fragile server may crash or hang
@spec("Protocol phases / Handshake / Newstyle negotiation", MUST)
def test_option_with_bad_magic_is_not_honoured(server):
    """An option without the IHAVEOPT magic is not an option: no success reply, server serves on.

    The server MAY hard-disconnect ("Termination of the session during option
    haggling"); it must not act on the request.
    """
    client = s.negotiated(server)
    try:
        client.send_option(Opt.GO, b"\0" * 6, magic=0x1122334455667788)
        outcome = client.expect_disconnect(DISCONNECT_TIMEOUT)
        acted = len(outcome.data) >= 16 and outcome.data[12:16] in (b"\0\0\0\x01", b"\0\0\0\x03")
        expect(
            not acted,
            "reply to an option with a bad magic",
            "an error or a disconnect",
            outcome.data[:40].hex(),
        )
    finally:
        client.close()
    s.assert_still_serving(server, "an option with a bad magic")


@pytest.mark.disruptive  # malformed framing: a fragile server may crash or hang
@spec("Protocol phases / Transmission / Request message", MUST)
def test_request_with_bad_magic_is_not_honoured(server):
    """A request without NBD_REQUEST_MAGIC must not be served (error or hard disconnect)."""
    client, _ = s.transmission(server)
    try:
        client.send_request(Cmd.READ, 0, 512, cookie=0x55, magic=0x12560953)  # historic magic
        outcome = client.expect_disconnect(DISCONNECT_TIMEOUT)
        ok_reply = SIMPLE_REPLY_MAGIC.to_bytes(4, "big") + bytes(4)
        expect(
            not outcome.data.startswith(ok_reply),
            "reply to a request with a bad magic",
            "no successful reply",
            outcome.data[:16].hex(),
        )
    finally:
        client.close()
    s.assert_still_serving(server, "a request with a bad magic")


@spec("Protocol phases / Transmission / Simple reply message", MUST)
def test_simple_reply_echoes_cookie(server):
    client, _ = s.transmission(server)
    try:
        cookie = 0xFEDCBA9876543210
        client.send_request(Cmd.READ, 0, 512, cookie=cookie)
        reply = client.recv_message()
        expect_equal(hex(reply.cookie), hex(cookie), "cookie of the reply")
        expect(isinstance(reply, m.SimpleReply), "reply type", "simple", type(reply).__name__)
        assert isinstance(reply, m.SimpleReply)
        expect_equal(reply.error, Errno.OK, "error of a 512-byte READ at offset 0")
    finally:
        client.disconnect()


@spec(
    "Protocol phases / Handshake / Newstyle negotiation",
    SHOULD,
    "The server SHOULD refuse to allow oldstyle negotiations on the newstyle port.",
)
def test_no_oldstyle_negotiation(server):
    """The greeting is newstyle (IHAVEOPT, not the oldstyle magic followed by the export size),
    on every connection, including one whose client never answers the greeting."""
    for _ in range(2):
        client = s.connect(server)
        try:
            greeting = client.recv_exactly(16, "greeting magics")
        finally:
            client.close()
        expect_equal(greeting[:8].hex(), NBDMAGIC.to_bytes(8, "big").hex(), "first magic")
        expect(
            greeting[8:16] != CLISERV_MAGIC.to_bytes(8, "big"),
            "second magic",
            f"IHAVEOPT ({IHAVEOPT:#x}), not the oldstyle {CLISERV_MAGIC:#x}",
            greeting[8:16].hex(),
        )


@spec(
    "Values / Handshake phase / Flag fields / Handshake flags",
    SHOULD,
    "SHOULD NOT change behaviour unless the client responds with a corresponding flag.",
)
def test_no_zeroes_only_when_the_client_sets_it(server):
    """The server offers NBD_FLAG_NO_ZEROES; a client that does not answer with
    NBD_FLAG_C_NO_ZEROES still gets the 124 zeroes after NBD_OPT_EXPORT_NAME."""
    client = s.connect(server)
    try:
        offered = client.read_greeting().flags
    finally:
        client.close()
    if not offered & HandshakeFlag.NO_ZEROES:
        unsupported("the server does not offer NBD_FLAG_NO_ZEROES")
    zeroes, magic = _next_reply_magic_after_export_name(server, int(ClientFlag.C_FIXED_NEWSTYLE))
    expect_equal(zeroes, bytes(124), "the 124 bytes after the export info without C_NO_ZEROES")
    expect_equal(magic.hex(), SIMPLE_REPLY_MAGIC.to_bytes(4, "big").hex(), "next reply magic")
