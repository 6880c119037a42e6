"""What the server sends during option haggling: information replies, strings, context names.

Raw-wire checks (conformance.wire): libnbd parses NBD_REP_INFO,
NBD_REP_SERVER and NBD_REP_META_CONTEXT for its caller and tolerates much.
These look at the bytes: every string the server sends (export names,
descriptions, context names) is UTF-8 without NUL and within the limits;
information requests the server does not know are ignored; size
constraints are advertised when they are enforced.
"""

from __future__ import annotations

import contextlib
import struct

import pytest

from conformance.servers.base import ProfileCannotDo, ServerConfig
from conformance.spec import MUST, SHOULD, SpecViolation, expect, expect_equal, spec, unsupported
from conformance.wire import BASE_ALLOCATION, Disconnected, Errno, Info, Opt, Rep, TransmissionFlag
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


@contextlib.contextmanager
def _negotiated(server):
    client = s.negotiated(server)
    try:
        yield client
    finally:
        client.close()


# ------------------------------------------------------------ information requests


@spec(INFO_GO, MUST, "The server MUST ignore any information requests it does not understand.")
def test_unknown_information_requests_are_ignored(server):
    """NBD_OPT_INFO, then NBD_OPT_GO, asking for three unknown types (and NBD_INFO_BLOCK_SIZE):
    the same success as without them, NBD_INFO_EXPORT included, nothing sent for the unknown
    types, and the export served."""
    with _negotiated(server) as client:
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
    with _negotiated(described_server) as client:
        for option in (Opt.INFO, Opt.GO):
            result = client.option(
                option, m.pack_name_and_infos(s.export_name(described_server), infos)
            )
            expect_equal(result.type.name, "ACK", f"{option.name} asking for each type twice")
            sent = [i.type.name for i in result.infos]
            twice = sorted({t for t in sent if sent.count(t) > 1})
            expect_equal(twice, [], f"types sent more than once to {option.name} ({sent})")


@spec(
    INFO_GO,
    MUST,
    "The server MUST NOT send this error if size constraints were requested with "
    "`NBD_INFO_BLOCK_SIZE` with the `NBD_OPT_INFO` or `NBD_OPT_GO` request.",
)
@pytest.mark.parametrize("minimum", [1, 4096])
def test_block_size_request_never_gets_block_size_reqd(start_server, minimum):
    server = start_server(ServerConfig(minimum_block_size=minimum))
    with _negotiated(server) as client:
        for option in (Opt.INFO, Opt.GO):
            result = client.option(
                option, m.pack_name_and_infos(s.export_name(server), (Info.BLOCK_SIZE,))
            )
            expect(
                result.type != Rep.ERR_BLOCK_SIZE_REQD,
                f"{option.name} requesting NBD_INFO_BLOCK_SIZE",
                "no NBD_REP_ERR_BLOCK_SIZE_REQD",
                result.describe(),
            )


@spec(
    INFO_GO,
    SHOULD,
    "A server sending an `NBD_REP_ERR_BLOCK_SIZE_REQD` error SHOULD ensure it first sends an "
    "`NBD_INFO_BLOCK_SIZE` information reply in order to help avoid a potentially unnecessary "
    "round trip.",
)
def test_block_size_reqd_comes_after_block_size_info(start_server):
    server = start_server(ServerConfig(minimum_block_size=4096))
    with _negotiated(server) as client:
        result = client.option(Opt.GO, m.pack_name_and_infos(s.export_name(server), ()))
    if result.type != Rep.ERR_BLOCK_SIZE_REQD:
        unsupported(f"the server does not require NBD_INFO_BLOCK_SIZE ({result.describe()})")
    expect(
        result.block_size is not None,
        "replies before NBD_REP_ERR_BLOCK_SIZE_REQD",
        "an NBD_INFO_BLOCK_SIZE",
        result.describe(),
    )


def _constrained(start_server):
    """A server told to enforce a 4096-byte minimum block size, and what GO says of it."""
    server = start_server(ServerConfig(minimum_block_size=4096))
    return server


def _check_block_size_sent(start_server) -> None:
    """A server configured with a 4096-byte minimum block size: asked in NBD_OPT_INFO and in
    NBD_OPT_GO, it says so (or it does not enforce it: an unaligned READ then succeeds)."""
    server = _constrained(start_server)
    missing = []
    with _negotiated(server) as client:
        for option in (Opt.INFO, Opt.GO):
            infos = (Info.BLOCK_SIZE,)
            result = client.option(option, m.pack_name_and_infos(s.export_name(server), infos))
            expect_equal(result.type.name, "ACK", f"{option.name} requesting NBD_INFO_BLOCK_SIZE")
            if result.block_size is None:
                missing.append(option.name)
    if not missing:
        return
    what = f"a server that sent no NBD_INFO_BLOCK_SIZE when asked ({', '.join(missing)})"
    try:
        client, _ = s.transmission(server, infos=())
    except m.ProtocolViolation as exc:
        raise SpecViolation(
            what, detail=f"expected no size constraint enforced, actual NBD_OPT_GO refused: {exc}"
        ) from None
    try:
        reply = client.read(1, 512)
    finally:
        client.close()
    expect_equal(reply.error.name, "OK", f"unaligned READ on {what}")


@spec(
    REP_INFO,
    MUST,
    "The server MUST send this info if it is requested and it intends to enforce size "
    "constraints other than the defaults.",
)
def test_enforced_block_size_is_sent_when_requested(start_server):
    _check_block_size_sent(start_server)


@spec(
    "Size constraints",
    SHOULD,
    "A server with size constraints other than the default SHOULD advertise the size "
    "constraints during handshake phase via `NBD_INFO_BLOCK_SIZE` in response to `NBD_OPT_INFO` "
    "or `NBD_OPT_GO`",
)
def test_enforced_block_size_is_advertised(start_server):
    """The same behaviour, graded at the SHOULD of 'Size constraints' (its MUST, 'unless agreed
    out of band', is test_enforced_block_size_is_sent_when_requested)."""
    _check_block_size_sent(start_server)


@spec(
    "Size constraints",
    MUST,
    "When allowing clients that did not negotiate sizing via NBD, a server that enforces "
    "stricter size constraints than the defaults MUST cleanly error commands that fall outside "
    "the constraints without corrupting data; even so, enforcing constraints in this manner may "
    "limit interoperability.",
)
@pytest.mark.writes
def test_unaligned_write_without_size_negotiation_corrupts_nothing(start_server):
    """A server with a 4096-byte minimum block size, a client that never asked for sizes: an
    unaligned WRITE either succeeds (and reads back) or fails and changes nothing."""
    server = _constrained(start_server)
    try:
        client, _ = s.transmission(server, infos=())
    except m.ProtocolViolation as exc:
        unsupported(f"the server does not admit clients that do not negotiate sizes ({exc})")
    try:
        before = b"\x3c" * 8192
        expect_equal(client.write(0, before).error, Errno.OK, "aligned WRITE of 8 KiB")
        patch = b"\xc3" * 1000
        error = client.write(1000, patch).error
        after = client.read(0, 8192)
        expect_equal(after.error, Errno.OK, "aligned READ of 8 KiB")
        data = after.data(0, 8192)
        want = before if error else before[:1000] + patch + before[2000:]
        what = "a refused" if error else "an accepted"
        expect(
            data == want,
            f"data after {what} unaligned WRITE",
            "consistent with its reply",
            "different bytes",
        )
    finally:
        client.close()


# ------------------------------------------------------------------- strings


def _check_string(data: bytes, what: str, *, limit: int = STRING_MAX) -> None:
    expect(b"\0" not in data, what, "no NUL character", data[:80])
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecViolation(what, "valid UTF-8", f"{exc}: {data[:80]!r}") from None
    expect(len(data) <= limit, f"length of {what}", f"<= {limit} bytes", len(data))


def _server_strings(server) -> list[tuple[str, bytes]]:
    """Every string the server sends: names and details of NBD_OPT_LIST, NAME and DESCRIPTION
    information, and metadata context names (LIST_META_CONTEXT with no query and with 'base:')."""
    found: list[tuple[str, bytes]] = []
    with _negotiated(server) as client:
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
                    for data in _context_replies(client, s.export_name(server), queries)
                ]
    return found


def _rep_server(data: bytes) -> tuple[bytes, bytes]:
    (length,) = struct.unpack_from(">I", data)
    return data[4 : 4 + length], data[4 + length :]


def _context_replies(client, name: bytes, queries: tuple[bytes, ...]) -> list[bytes]:
    client.send_option(Opt.LIST_META_CONTEXT, m.pack_meta_context_query(name, queries))
    result = client.recv_option_result()
    return [r.data for r in result.intermediate if r.type == Rep.META_CONTEXT]


STRINGS = (
    "Where this document refers to a string, then unless otherwise stated, that string is a "
    "sequence of UTF-8 code points, which is not `NUL` terminated, MUST NOT contain `NUL` "
    "characters"
)


@spec("Conventions", MUST, STRINGS)
def test_strings_the_server_sends_have_no_nul(described_server):
    """A C server sending strlen + 1 bytes (the terminator included) fails here."""
    for what, data in _server_strings(described_server):
        _check_string(data, what)


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
    with _negotiated(described_server) as client:
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


# --------------------------------------------------------- metadata context names


def _contexts(server, *query_sets: tuple[bytes, ...]) -> list[bytes]:
    """The NBD_REP_META_CONTEXT payloads listed for each set of queries, on one connection."""
    with _negotiated(server) as client:
        if client.structured_reply().type != Rep.ACK:
            unsupported("the server does not support NBD_OPT_STRUCTURED_REPLY")
        replies: list[bytes] = []
        try:
            for queries in query_sets:
                replies += _context_replies(client, s.export_name(server), queries)
        except Disconnected as exc:
            raise SpecViolation("NBD_OPT_LIST_META_CONTEXT", "replies", str(exc)) from None
    if not replies:
        unsupported("the server lists no metadata context")
    return replies


@spec(
    "Metadata querying",
    MUST,
    "The name MUST consist of a namespace, followed by a colon, followed by a leaf-name.",
)
def test_context_names_are_namespace_colon_leaf(server):
    for data in _contexts(server, (), (b"base:",)):
        name = data[4:]
        namespace, colon, _leaf = name.partition(b":")
        expect(namespace and colon, "metadata context name", "namespace:leaf-name", name)


@spec(
    "Metadata querying",
    MUST,
    "The entire name (namespace, colon, and leaf-name) MUST follow the restrictions for strings "
    "as laid out earlier in this document.",
)
def test_context_names_are_valid_strings(server):
    for data in _contexts(server, (), (b"base:",)):
        _check_string(data[4:], "metadata context name")


@spec(
    "Values / Handshake phase / Option reply types",
    MUST,
    "This is not required to be a human-readable string, but it MUST be valid UTF-8 data.",
)
def test_context_names_are_utf8(server):
    for data in _contexts(server, ()):
        try:
            data[4:].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecViolation("metadata context name", "valid UTF-8", str(exc)) from None


@spec(
    LIST_META,
    MUST,
    "However each namespace returned MUST begin with the relevant namespace, followed by a colon, "
    "and then other UTF-8 characters, with the entire string following the restrictions for "
    "strings set out earlier in this document.",
)
def test_listed_contexts_begin_with_the_queried_namespace(server):
    for data in _contexts(server, (b"base:",)):
        expect(
            data[4:].startswith(b"base:"),
            "context listed for the query 'base:'",
            "a name beginning 'base:'",
            data[4:],
        )
        _check_string(data[4:], "context listed for the query 'base:'")


@spec(
    LIST_META,
    SHOULD,
    "The metadata context ID in these replies is reserved and SHOULD be set to zero",
)
def test_listed_context_ids_are_zero(server):
    for data in _contexts(server, (), (BASE_ALLOCATION.encode(),)):
        (context_id,) = struct.unpack_from(">I", data)
        expect_equal(context_id, 0, f"context ID listed for {data[4:]!r}")


@spec(LIST_META, SHOULD, "In this case, the server SHOULD NOT fail with `NBD_REP_ERR_TOO_BIG`.")
def test_list_of_all_contexts_is_not_too_big(server):
    with _negotiated(server) as client:
        if client.structured_reply().type != Rep.ACK:
            unsupported("the server does not support NBD_OPT_STRUCTURED_REPLY")
        client.send_option(
            Opt.LIST_META_CONTEXT, m.pack_meta_context_query(s.export_name(server), ())
        )
        result = client.recv_option_result()
    expect(
        result.type != Rep.ERR_TOO_BIG,
        "NBD_OPT_LIST_META_CONTEXT with no query",
        "no NBD_REP_ERR_TOO_BIG",
        result.describe(),
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
