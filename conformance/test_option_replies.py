"""What the server sends during option haggling: information replies and strings.

Raw-wire checks (conformance.wire): libnbd parses NBD_REP_INFO and
NBD_REP_SERVER for its caller and tolerates much.  These look at the bytes:
every string the server sends (export names, descriptions) is UTF-8 without
NUL and within the limits; information requests the server does not know are
ignored.  Size constraints are test_block_size_constraints.py's, context names
test_meta_context_options.py's.
"""

from __future__ import annotations

import contextlib
import struct

import pytest

from conformance.servers.base import ProfileCannotDo, ServerConfig
from conformance.spec import MUST, SHOULD, expect, expect_equal, expect_string, spec, unsupported
from conformance.wire import Disconnected, Errno, Info, Opt, Rep, TransmissionFlag
from conformance.wire import messages as m
from conformance.wire import session as s
from conformance.wire.constants import STRING_MAX

INFO_GO = "Values / Handshake phase / Option types"
REP_INFO = "Values / Handshake phase / Option reply types"
LIST_META = "Values / Handshake phase / Option types"
#: Information types no version of the spec defines (NBD_INFO_* are 0 to 3).
UNKNOWN_INFOS = (0x7FFF, 0x1234, 0xFFFF)
NAME = "conformance-export"
DESCRIPTION = "an export the conformance suite started"


@pytest.fixture
def described_server(start_server, nbd_profile):
    """A server with a named, described export (the strings it sends are then known); only
    named where the profile cannot describe exports."""
    config = ServerConfig(export_name=NAME, description=DESCRIPTION)
    try:
        nbd_profile.check_config(config)
    except ProfileCannotDo:
        config = ServerConfig(export_name=NAME)
    return start_server(config)


# ------------------------------------------------------------ information requests


@spec(INFO_GO, MUST, "The server MUST ignore any information requests it does not understand.")
def test_unknown_information_requests_are_ignored(server):
    """NBD_OPT_INFO, then NBD_OPT_GO, asking for three unknown types (and NBD_INFO_BLOCK_SIZE):
    the same success as without them, NBD_INFO_EXPORT included, nothing sent for the unknown
    types, and the export served."""
    with s.negotiated(server) as client:
        infos = (*UNKNOWN_INFOS[:2], Info.BLOCK_SIZE, UNKNOWN_INFOS[2])
        for option in (Opt.INFO, Opt.GO):
            result = client.option(option, m.pack_name_and_infos(s.export_name(server), infos))
            what = f"{option.name} with unknown information requests"
            expect_equal(result.type.name, "ACK", what)
            expect(
                result.export is not None, f"NBD_INFO_EXPORT ({what})", "sent", result.describe()
            )
            sent = [i.type for i in result.infos]
            unknown = [hex(t) for t in sent if t in UNKNOWN_INFOS]
            expect_equal(unknown, [], f"replies for the unknown information types ({what})")
        reply = client.read(0, 512)
        expect_equal(reply.error, Errno.OK, "READ after NBD_OPT_GO with unknown requests")


@spec(
    REP_INFO,
    SHOULD,
    "A particular information type SHOULD only appear once for a given export unless documented "
    "otherwise.",
)
def test_each_information_type_is_sent_once(described_server):
    """Every type asked for twice (and NBD_INFO_EXPORT asked for explicitly), in NBD_OPT_INFO
    and then NBD_OPT_GO: each sent at most once per reply."""
    infos = (Info.NAME, Info.BLOCK_SIZE, Info.DESCRIPTION, Info.EXPORT) * 2
    with s.negotiated(described_server) as client:
        for option in (Opt.INFO, Opt.GO):
            result = client.option(
                option, m.pack_name_and_infos(s.export_name(described_server), infos)
            )
            expect_equal(result.type.name, "ACK", f"{option.name} asking for each type twice")
            sent = [i.type.name for i in result.infos]
            twice = sorted({t for t in sent if sent.count(t) > 1})
            expect_equal(twice, [], f"types sent more than once to {option.name} ({sent})")


# ------------------------------------------------------------------- strings


def _server_strings(server) -> list[tuple[str, bytes]]:
    """Every string the server sends: names and details of NBD_OPT_LIST, NAME and DESCRIPTION
    information, and metadata context names (LIST_META_CONTEXT with no query and with 'base:')."""
    found: list[tuple[str, bytes]] = []
    with s.negotiated(server) as client:
        listed = client.option(Opt.LIST)
        for reply in listed.intermediate:
            if reply.type == Rep.SERVER:
                name, details = _rep_server(reply.data)
                found += [("an export name in NBD_REP_SERVER", name)]
                if details:
                    found += [("the details of NBD_REP_SERVER", details)]
        infos = (Info.NAME, Info.DESCRIPTION)
        result = client.option(Opt.INFO, m.pack_name_and_infos(s.export_name(server), infos))
        for reply in result.intermediate:
            kind = struct.unpack_from(">H", reply.data)[0] if len(reply.data) >= 2 else None
            if reply.type == Rep.INFO and kind in (Info.NAME, Info.DESCRIPTION):
                found.append((f"{Info(kind).name} in NBD_REP_INFO", reply.data[2:]))
        if client.structured_reply().type == Rep.ACK:
            for queries in ((), (b"base:",)):
                found += [
                    ("a context name in NBD_REP_META_CONTEXT", data[4:])
                    for data in client.list_meta_context(
                        s.export_name(server), queries
                    ).context_replies
                ]
    return found


def _rep_server(data: bytes) -> tuple[bytes, bytes]:
    (length,) = struct.unpack_from(">I", data)
    return data[4 : 4 + length], data[4 + length :]


STRINGS = (
    "Where this document refers to a string, then unless otherwise stated, that string is a "
    "sequence of UTF-8 code points, which is not `NUL` terminated, MUST NOT contain `NUL` "
    "characters"
)


@spec("Conventions", MUST, STRINGS)
def test_strings_the_server_sends_have_no_nul(described_server):
    """A C server sending strlen + 1 bytes (the terminator included) fails here."""
    for what, data in _server_strings(described_server):
        expect_string(data, what)


@spec("Conventions", MUST, "MUST be no longer than 4096 bytes.")
def test_strings_the_server_sends_fit_4096_bytes(described_server):
    for what, data in _server_strings(described_server):
        expect(len(data) <= STRING_MAX, f"length of {what}", "<= 4096 bytes", len(data))


@spec("Conventions", SHOULD, "SHOULD be no longer than 256 bytes")
def test_strings_the_server_sends_fit_256_bytes(described_server):
    for what, data in _server_strings(described_server):
        expect(len(data) <= 256, f"length of {what}", "<= 256 bytes", len(data))


@spec(
    "Values / Handshake phase / Option reply types",
    MUST,
    "32 bits, length of name (unsigned); MUST be no larger than the reply packet header length - 4",
)
def test_rep_server_name_length_fits_the_reply(described_server):
    with s.negotiated(described_server) as client:
        listed = client.option(Opt.LIST)
    replies = [r for r in listed.intermediate if r.type == Rep.SERVER]
    expect(replies, "NBD_REP_SERVER replies to NBD_OPT_LIST", "at least one", listed.describe())
    for reply in replies:
        expect(len(reply.data) >= 4, "NBD_REP_SERVER length", ">= 4", len(reply.data))
        (length,) = struct.unpack_from(">I", reply.data)
        expect(
            length <= len(reply.data) - 4,
            "NBD_REP_SERVER name length",
            f"<= {len(reply.data) - 4} (reply length - 4)",
            length,
        )


# ------------------------------------------------------------------------ ABORT


@spec(
    "Values / Handshake phase / Option types",
    SHOULD,
    "Similarly the server SHOULD gracefully handle the client sending an `NBD_OPT_ABORT` and "
    "closing the connection without waiting for a reply.",
)
def test_abort_then_close_without_reading(server):
    """Eight clients send NBD_OPT_ABORT and close at once (some right after a LIST whose replies
    they never read): the server goes on serving."""
    for i in range(8):
        client = s.negotiated(server)
        with contextlib.suppress(Disconnected, OSError):
            if i % 2:
                client.send_option(Opt.LIST)
            client.send_option(Opt.ABORT)
        client.close()
    s.assert_still_serving(server, "clients that sent NBD_OPT_ABORT and closed at once")


# ------------------------------------- extensions advertised only once negotiated

STRUCTURED = "Values / Handshake phase / Option types"
EXTENDED = "Values / Handshake phase / Option types"


def _flags_without(server, *, structured: bool = False):
    """The transmission flags NBD_OPT_GO gives a client that negotiated nothing (or only
    structured replies)."""
    client = s.negotiated(server)
    try:
        if structured and client.structured_reply().type != Rep.ACK:
            unsupported("the server does not support NBD_OPT_STRUCTURED_REPLY")
        go = client.go(s.export_name(server))
        expect_equal(go.type.name, "ACK", "NBD_OPT_GO")
        assert go.export is not None
        return go.export.flags
    finally:
        client.close()


def _expect_not_advertised(flags, names: tuple[str, ...], before: str) -> None:
    shown = [n for n in names if flags & getattr(TransmissionFlag, n)]
    expect_equal(shown, [], f"transmission flags of extensions advertised before {before}")


@spec(
    STRUCTURED,
    SHOULD,
    "A server that supports such extensions SHOULD NOT advertise those extensions until the "
    "client negotiates structured replies",
)
def test_no_structured_reply_extensions_advertised_before_negotiation(server):
    """NBD_FLAG_SEND_DF (its replies are structured) is not offered without structured
    replies."""
    _expect_not_advertised(_flags_without(server), ("SEND_DF",), "structured replies")


@spec(
    STRUCTURED,
    SHOULD,
    "A server that supports such extensions SHOULD NOT advertise those extensions until the "
    "client has negotiated either structured replies or extended headers",
)
def test_no_reply_payload_extensions_advertised_before_negotiation(server):
    """Neither NBD_FLAG_SEND_DF nor NBD_FLAG_BLOCK_STATUS_PAYLOAD without reply payloads."""
    names = ("SEND_DF", "BLOCK_STATUS_PAYLOAD")
    _expect_not_advertised(_flags_without(server), names, "structured replies or extended headers")


@spec(
    EXTENDED,
    SHOULD,
    "A server that supports such extensions SHOULD NOT advertise those extensions until the "
    "client has negotiated extended headers",
)
def test_no_extended_header_extensions_advertised_before_negotiation(server):
    """NBD_FLAG_BLOCK_STATUS_PAYLOAD is not offered to a client with structured replies only."""
    flags = _flags_without(server, structured=True)
    _expect_not_advertised(flags, ("BLOCK_STATUS_PAYLOAD",), "extended headers")
