"""Regression checks for option-haggling bugs real NBD servers shipped, each named after its CVE.

Export names longer than a server's buffer (CVE-2017-15118, CVE-2022-26495,
CVE-2022-26496), names echoed into error messages (CVE-2020-10761), clients
that hang up mid-negotiation (CVE-2013-7441) and options that claim ~4 GiB
(CVE-2017-15119).  Each check drives the hostile interaction over the raw
wire, judges what the spec lets the server answer (conformance.wire.outcomes),
then proves the server still serves a well-behaved client
(conformance.wire.session.assert_still_serving).
"""

from __future__ import annotations

import socket
import struct

import pytest

from conformance.spec import MUST, SHOULD, expect, spec, unsupported
from conformance.wire import Disconnected, Info, Opt
from conformance.wire import messages as m
from conformance.wire import outcomes as o
from conformance.wire import session as s
from conformance.wire.constants import STRING_MAX

# Reproducers of crashes and hangs: against a server the suite did not start
# they run only with --allow-disruptive.
pytestmark = pytest.mark.disruptive

STRING_RULE = "MUST be no longer than 4096 bytes."

# --------------------------------------------------------- CVE-2017-15118


def _send_name(server, option: Opt, name: bytes):
    """The answer to OPTION naming NAME ('entered transmission' for NBD_OPT_EXPORT_NAME)."""
    if option != Opt.EXPORT_NAME:
        data = m.pack_name_and_infos(name, (Info.NAME,))
        return o.option_on_new_connection(server, option, data)
    client = s.negotiated(server)

    def export_information() -> str:
        client.recv_exactly(10, "export information")
        return "entered transmission"

    try:
        client.send_option(Opt.EXPORT_NAME, name)
        return o.within(client, export_information)
    except Disconnected:
        return o.DISCONNECT
    finally:
        client.close()


@spec(
    "Protocol phases / Handshake / Termination of the session during option haggling",
    MUST,
    "A party MUST NOT initiate a hard disconnect save where set out in this section.",
)
@pytest.mark.parametrize("length", [STRING_MAX, STRING_MAX + 1, 65536])
@pytest.mark.parametrize("option", [Opt.EXPORT_NAME, Opt.INFO, Opt.GO], ids=lambda o: o.name)
def test_cve_2017_15118_long_export_name(server, option, length):
    """qemu overflowed a stack buffer with export names longer than it supported.

    A name within the 4096-byte limit gets an answer; a longer one an error or a
    hard disconnect; either way the server keeps serving."""
    if option == Opt.EXPORT_NAME and s.tls_context(server) is not None:
        unsupported("NBD_OPT_EXPORT_NAME is not sent on a TLS connection by this check")
    outcome = _send_name(server, option, b"e" * length)
    if option != Opt.EXPORT_NAME:
        if length <= STRING_MAX:
            expect(
                not isinstance(outcome, str),
                f"{option.name} with a {length}-byte name",
                "an option reply",
                o.describe(outcome),
            )
        else:
            expect(
                o.refused(outcome),
                f"{option.name} with a {length}-byte name",
                "an error reply or a disconnect",
                o.describe(outcome),
            )
    expect(
        outcome != "no reply",
        f"{option.name} with a {length}-byte name",
        "an answer",
        f"nothing within {o.WAIT}s",
    )
    s.assert_still_serving(server, f"{option.name} with a {length}-byte export name")


# ------------------------------------------------- CVE-2022-26495 / 26496


@spec("Values / Handshake phase / Option types", MUST)
@pytest.mark.parametrize("name_length", [0xFFFFFFFF, 0xFFFFFFFA, 0x80000000], ids=hex)
@pytest.mark.parametrize("option", [Opt.INFO, Opt.GO], ids=lambda o: o.name)
def test_cve_2022_26495_name_length_overflow(server, option, name_length):
    """nbd-server allocated name_length + 1 bytes (0 after overflow) and wrote into it."""
    data = m.pack_name_and_infos(b"x" * 8, (), name_length=name_length)
    outcome = o.option_on_new_connection(server, option, data)
    expect(
        o.refused(outcome),
        f"{option.name} with name length {name_length:#x}",
        "an error reply or a disconnect",
        o.describe(outcome),
    )
    s.assert_still_serving(server, f"{option.name} with name length {name_length:#x}")


@spec("Conventions", MUST)
@pytest.mark.parametrize("length", [8192, 1 << 20])
@pytest.mark.parametrize("option", [Opt.INFO, Opt.GO], ids=lambda o: o.name)
def test_cve_2022_26496_oversized_name(server, option, length):
    """nbd-server copied an attacker-sized name into a stack buffer."""
    outcome = _send_name(server, option, b"n" * length)
    expect(
        o.refused(outcome),
        f"{option.name} with a {length}-byte name",
        "an error reply or a disconnect",
        o.describe(outcome),
    )
    s.assert_still_serving(server, f"{option.name} with a {length}-byte name")


# ----------------------------------------------------------- CVE-2013-7441


def _hang_up(server, stage: str) -> None:
    client = s.connect(server)
    try:
        if stage == "reset-after-connect":
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if stage == "after-connect":
            return
        client.read_greeting()
        if stage == "after-greeting":
            return
        if stage == "mid-client-flags":
            client.send(b"\0\0")
            return
        client.send_client_flags(1)
        if stage == "after-client-flags":
            return
        option = m.pack_option(Opt.GO, m.pack_name_and_infos(s.export_name(server)))
        if stage == "mid-option-header":
            client.send(option[:10])
        elif stage == "mid-option-data":
            client.send(option[:-3])
        elif stage == "after-go":
            client.send(option)
        elif stage == "unknown-export-name":
            client.send(m.pack_option(Opt.EXPORT_NAME, b"conformance-no-such-export"))
            client.expect_disconnect(o.WAIT)
    except Disconnected:
        pass
    finally:
        client.close()


HANG_UPS = [
    "reset-after-connect",
    "after-connect",
    "after-greeting",
    "mid-client-flags",
    "after-client-flags",
    "mid-option-header",
    "mid-option-data",
    "after-go",
    "unknown-export-name",
]


@spec(
    "Protocol phases / Handshake / Termination of the session during option haggling",
    MUST,
    "There is no requirement for the client or server to complete a negotiation if it does not "
    "wish to do so.",
)
@pytest.mark.parametrize("stage", HANG_UPS)
def test_cve_2013_7441_client_hangs_up_during_negotiation(server, stage):
    """nbd-server died when a client went away mid-negotiation or named a missing export."""
    if stage == "unknown-export-name" and s.tls_context(server) is not None:
        unsupported("NBD_OPT_EXPORT_NAME is not sent on a TLS connection by this check")
    _hang_up(server, stage)
    s.assert_still_serving(server, f"a client that hung up ({stage})")


# ---------------------------------------------------------- CVE-2017-15119

HUGE = 0xFFFFFFF0


@spec("Protocol phases / Handshake / Termination of the session during option haggling", SHOULD)
@pytest.mark.parametrize("option", [Opt.GO, Opt.LIST, Opt(0x2A)], ids=lambda o: o.name)
def test_cve_2017_15119_huge_option_is_refused(server, option):
    """qemu read (and allocated) whatever length an option claimed.  An option claiming ~4 GiB
    should be refused at once (an error reply and/or a hard disconnect), not read; a server
    that silently waits for the 4 GiB is reported at SHOULD level."""
    outcome = o.option_on_new_connection(server, option, b"\0" * 64, length=HUGE)
    expect(
        o.refused(outcome),
        f"option {option.name} claiming {HUGE} bytes",
        "an error reply or a disconnect",
        o.describe(outcome),
    )


@spec("Protocol phases / Handshake / Termination of the session during option haggling", MUST)
def test_cve_2017_15119_huge_option_does_not_block_others(server):
    client = s.negotiated(server)
    try:
        client.send_option(0x2A, b"\0" * 4096, length=HUGE)
        s.assert_still_serving(server, "an option claiming 4 GiB (still open)")
    except Disconnected:
        pass
    finally:
        client.close()
    s.assert_still_serving(server, "an option claiming 4 GiB")


# ---------------------------------------------------------- CVE-2020-10761

LONG = b"x" * STRING_MAX


def _long_name_option(option: Opt) -> bytes:
    if option in (Opt.INFO, Opt.GO):
        return m.pack_name_and_infos(LONG, (Info.NAME, Info.DESCRIPTION))
    return m.pack_meta_context_query(LONG, (b"base:" + LONG[5:], b"qemu:" + LONG[5:]))


@spec("Conventions", MUST, STRING_RULE)
@pytest.mark.parametrize(
    "option",
    [Opt.INFO, Opt.GO, Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT],
    ids=lambda o: o.name,
)
def test_cve_2020_10761_long_name_echoed_in_error(server, option):
    """qemu asserted when a 4096-byte name echoed into an error message overflowed the limit.
    Valid 4096-byte strings get a reply whose error message is itself within the limit."""
    meta = option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT)
    first = (Opt.STRUCTURED_REPLY,) if meta else ()
    outcome = o.option_on_new_connection(server, option, _long_name_option(option), first=first)
    expect(
        not isinstance(outcome, str),
        f"{option.name} with 4096-byte strings",
        "an option reply",
        o.describe(outcome),
    )
    for reply in outcome.replies:
        if reply.is_error:
            expect(
                len(reply.data) <= STRING_MAX,
                f"error message in {reply.type.name}",
                "<= 4096 bytes",
                len(reply.data),
            )
    s.assert_still_serving(server, f"{option.name} with 4096-byte strings")
