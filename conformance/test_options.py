"""Option haggling: unknown options, LIST, ABORT, INFO/GO and their malformed lengths.

Raw-wire checks (conformance.wire): libnbd 1.14 cannot send unknown options
or lying length fields.  The metadata-context options are
test_meta_context_options.py's.
"""

from __future__ import annotations

import struct

import pytest

from conformance.servers.base import ServerConfig
from conformance.spec import MUST, SHOULD, expect, expect_equal, spec, unsupported
from conformance.wire import Disconnected, Info, Opt, ProtocolViolation, Rep
from conformance.wire import messages as m
from conformance.wire import outcomes as o
from conformance.wire import session as s
from conformance.wire.constants import OPTION_REPLY_MAGIC, STRING_MAX

UNKNOWN_OPTIONS = [Opt.PEEK_EXPORT, 0x2A, 0x7FFFFFFF]
NO_SUCH_EXPORT = b"conformance-no-such-export-7f3a"


# ----------------------------------------------------------- unknown options


@spec(
    "Values / Handshake phase / Option reply types",
    MUST,
    "The option sent by the client is unknown by this server implementation (e.g., because the "
    "server is too old, or from another source).",
)
@pytest.mark.parametrize("option", UNKNOWN_OPTIONS, ids=hex)
def test_unknown_option_gets_err_unsup(server, option):
    with s.negotiated(server) as client:
        result = client.option(option)
        expect_equal(result.type.name, "ERR_UNSUP", f"reply to option {option:#x}")


@spec(
    "Protocol phases / Handshake / Newstyle negotiation",
    MUST,
    "The presence of the option length in every option allows the server to skip any options "
    "presented by the client that it does not understand.",
)
def test_unknown_option_payload_is_skipped(server):
    with s.negotiated(server) as client:
        client.option(0x2A, bytes(range(256)) * 4)
        result = client.go(s.export_name(server))
        expect_equal(result.type.name, "ACK", "NBD_OPT_GO after an unknown option with payload")


@spec("Protocol phases / Handshake / Fixed newstyle negotiation", MUST)
@pytest.mark.parametrize("option", [Opt.LIST, 0x2A], ids=hex)
def test_option_reply_echoes_option(server, option):
    """ "S: 32 bits, the option as sent by the client to which this is a reply"."""
    with s.negotiated(server) as client:
        result = client.option(option)
        for reply in result.replies:
            expect_equal(hex(reply.option), hex(option), f"option field of {reply.type.name}")


@spec("Protocol phases / Handshake / Fixed newstyle negotiation", MUST)
def test_option_reply_magic(server):
    """ "S: 64 bits, `0x3e889045565a9` (magic number for replies)"."""
    with s.negotiated(server) as client:
        client.send_option(Opt.LIST)
        header = client.recv_exactly(m.OPTION_REPLY_HEADER.size, "option reply header")
        magic = struct.unpack_from(">Q", header)[0]
        expect_equal(hex(magic), hex(OPTION_REPLY_MAGIC), "option reply magic")


# ---------------------------------------------------------------- LIST, ABORT


def _list(client):
    result = client.option(Opt.LIST)
    if result.type == Rep.ERR_POLICY:
        unsupported("NBD_OPT_LIST is refused by the server's policy")
    return result


@spec(
    "Values / Handshake phase / Option types",
    MUST,
    "Return zero or more `NBD_REP_SERVER` replies, one for each export, followed by "
    "`NBD_REP_ACK` or an error (such as `NBD_REP_ERR_SHUTDOWN`).",
)
def test_list_replies_are_servers_then_ack(server):
    with s.negotiated(server) as client:
        result = _list(client)
        kinds = [r.type.name for r in result.intermediate]
        expect(all(k == "SERVER" for k in kinds), "replies before the final one", "SERVER", kinds)
        expect_equal(result.type.name, "ACK", "final reply to NBD_OPT_LIST")


@spec(
    "Values / Handshake phase / Option types",
    MUST,
    "Return zero or more `NBD_REP_SERVER` replies, one for each export, followed by "
    "`NBD_REP_ACK` or an error (such as `NBD_REP_ERR_SHUTDOWN`).",
)
def test_list_includes_the_export(server):
    with s.negotiated(server) as client:
        names = [name for name, _ in _list(client).exports]
        expect(s.export_name(server) in names, "exports listed", s.export_name(server), names)


@spec(
    "Values / Handshake phase / Option types",
    SHOULD,
    "The client MUST NOT send any additional data with the option, and the server SHOULD reject "
    "a request that includes data with `NBD_REP_ERR_INVALID`.",
)
def test_list_with_data_gets_err_invalid(server):
    with s.negotiated(server) as client:
        expect_equal(
            o.option_outcome(client, Opt.LIST, b"junk"), "ERR_INVALID", "NBD_OPT_LIST + data"
        )


@spec("Values / Handshake phase / Option types", MUST, "The server MUST reply with `NBD_REP_ACK`.")
def test_abort_gets_ack(server):
    with s.negotiated(server) as client:
        expect_equal(o.option_outcome(client, Opt.ABORT, b""), "ACK", "reply to NBD_OPT_ABORT")
    s.assert_still_serving(server, "NBD_OPT_ABORT")


@spec(
    "Values / Handshake phase / Option types",
    SHOULD,
    "The client SHOULD NOT send any additional data with the option; however, a server SHOULD "
    "ignore any data sent by the client rather than rejecting the request as invalid.",
)
def test_abort_with_data_gets_ack(server):
    with s.negotiated(server) as client:
        expect_equal(o.option_outcome(client, Opt.ABORT, b"junk"), "ACK", "NBD_OPT_ABORT + data")


# -------------------------------------------------------------------- INFO/GO

ALL_INFOS = (Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE)
INFO_LENGTHS = {Info.EXPORT: "== 12", Info.BLOCK_SIZE: "== 14", Info.NAME: ">= 2"}


@spec(
    "Values / Handshake phase / Option types",
    MUST,
    "In this case, the server MUST send at least one `NBD_REP_INFO`, with an `NBD_INFO_EXPORT` "
    "information type.",
)
@pytest.mark.parametrize("option", [Opt.INFO, Opt.GO], ids=lambda o: o.name)
def test_success_includes_info_export(server, option):
    with s.negotiated(server) as client:
        result = client.option(option, m.pack_name_and_infos(s.export_name(server), ALL_INFOS))
        expect_equal(result.type.name, "ACK", f"final reply to {option.name}")
        kinds = [struct.unpack_from(">H", r.data)[0] for r in result.intermediate if r.data]
        expect(Info.EXPORT in kinds, "information types sent", "NBD_INFO_EXPORT among them", kinds)


@spec("Values / Handshake phase / Option reply types", MUST)
def test_info_replies_have_specified_lengths(server):
    """NBD_INFO_EXPORT: "*length* MUST be 12"; BLOCK_SIZE: 14; NAME, DESCRIPTION: at least 2."""
    with s.negotiated(server) as client:
        result = client.info(s.export_name(server), ALL_INFOS)
        expect_equal(result.type.name, "ACK", "final reply to NBD_OPT_INFO")
        wanted = {Info.EXPORT: 12, Info.BLOCK_SIZE: 14}
        for reply in result.intermediate:
            expect(len(reply.data) >= 2, "NBD_REP_INFO length", ">= 2", len(reply.data))
            kind = Info(struct.unpack_from(">H", reply.data)[0])
            if kind in wanted:
                expect_equal(len(reply.data), wanted[kind], f"length of {kind.name}")
        try:
            _ = result.infos
        except ProtocolViolation as exc:
            expect(False, "NBD_REP_INFO payloads", "valid", str(exc))


@spec(
    "Values / Handshake phase / Option types",
    MUST,
    "If there are no intervening option requests between a successful `NBD_OPT_INFO` (that is, "
    "one where the reply ended with a final `NBD_REP_ACK`) and an `NBD_OPT_GO` with the same "
    "parameters (including the list of information items requested), then the server MUST reply "
    "with the same set of information, such as transmission flags in the `NBD_INFO_EXPORT` reply, "
    "although the ordering of the intermediate `NBD_REP_INFO` messages MAY differ.",
)
def test_go_repeats_what_info_said(server):
    with s.negotiated(server) as client:
        name = s.export_name(server)
        info = client.info(name, ALL_INFOS)
        go = client.go(name, ALL_INFOS)
        expect_equal(go.type.name, "ACK", "NBD_OPT_GO after NBD_OPT_INFO")
        expect_equal(_by_type(go), _by_type(info), "information sent (GO vs the earlier INFO)")


def _by_type(result) -> dict[str, object]:
    return {item.type.name: item.value for item in result.infos}


@spec("Values / Handshake phase / Option types", MUST)
@pytest.mark.parametrize("option", [Opt.INFO, Opt.GO], ids=lambda o: o.name)
def test_unknown_export_gets_err_unknown(server, option):
    """ "`NBD_REP_ERR_UNKNOWN`: The chosen export does not exist on this server." """
    with s.negotiated(server) as client:
        result = client.option(option, m.pack_name_and_infos(NO_SUCH_EXPORT))
        if result.ok:
            unsupported(f"the server accepts any export name (even {NO_SUCH_EXPORT!r})")
        expect_equal(result.type.name, "ERR_UNKNOWN", f"{option.name} for a nonexistent export")


@spec(
    "Values / Handshake phase / Option types",
    SHOULD,
    "In this case, the server SHOULD NOT send `NBD_REP_INFO` replies.",
)
def test_unknown_export_sends_no_info(server):
    with s.negotiated(server) as client:
        result = client.go(NO_SUCH_EXPORT)
        if result.ok:
            unsupported(f"the server accepts any export name (even {NO_SUCH_EXPORT!r})")
        expect_equal([r.type.name for r in result.intermediate], [], "replies before the error")
    s.assert_still_serving(server, "NBD_OPT_GO for a nonexistent export")


def _malformed_info_payloads(name: bytes) -> dict[str, tuple[bytes, int | None]]:
    """Payloads whose inner lengths contradict the option length: (data, claimed length)."""
    good = m.pack_name_and_infos(name, (Info.BLOCK_SIZE,))
    return {
        "name-length-past-end": (m.pack_name_and_infos(name, (), name_length=len(name) + 3), None),
        "name-length-4g": (m.pack_name_and_infos(name, (), name_length=0xFFFFFFFF), None),
        "info-count-past-end": (struct.pack(">I", len(name)) + name + struct.pack(">H", 50), None),
        "shorter-than-6": (struct.pack(">I", 0), None),
        "trailing-garbage": (good + b"\0", None),
    }


MALFORMED = list(_malformed_info_payloads(b"").keys())
# Trailing bytes after the information requests break the layout, but reading
# them is harmless: only the SHOULD-level check insists on NBD_REP_ERR_INVALID.
OVERRUNS = [case for case in MALFORMED if case != "trailing-garbage"]


@pytest.mark.disruptive  # malformed framing: a fragile server may crash or hang
@spec("Values / Handshake phase / Option types", MUST)
@pytest.mark.parametrize("option", [Opt.INFO, Opt.GO], ids=lambda o: o.name)
@pytest.mark.parametrize("case", OVERRUNS)
def test_malformed_info_request_is_rejected(server, option, case):
    """An INFO/GO whose inner lengths contradict the option length gets an error or a hard
    disconnect ("Termination of the session during option haggling"): never success, never a
    server waiting for bytes beyond the option."""
    data, length = _malformed_info_payloads(s.export_name(server))[case]
    with s.negotiated(server) as client:
        outcome = o.option_outcome(client, option, data, length=length)
    expect(
        outcome == "disconnect" or outcome.startswith("ERR_"),
        f"{option.name} {case}",
        "an error reply or a disconnect",
        outcome,
    )
    s.assert_still_serving(server, f"a malformed {option.name} ({case})")


@pytest.mark.disruptive  # malformed framing: a fragile server may crash or hang
@spec(
    "Values / Handshake phase / Option reply types",
    SHOULD,
    "The option sent by the client is known by this server, but was determined by the server to "
    "be syntactically or semantically invalid.",
)
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_info_request_gets_err_invalid(server, case):
    data, length = _malformed_info_payloads(s.export_name(server))[case]
    with s.negotiated(server) as client:
        outcome = o.option_outcome(client, Opt.INFO, data, length=length)
    if outcome == "disconnect":
        return  # permitted: the server MAY hard-disconnect a client breaking a MUST
    expect_equal(outcome, "ERR_INVALID", f"NBD_OPT_INFO {case}")


@spec(
    "Protocol phases / Handshake / Termination of the session during option haggling",
    MUST,
    "A party MUST NOT initiate a hard disconnect save where set out in this section.",
)
def test_info_with_4096_byte_name_is_answered(server):
    """A 4096-byte name is within the string limit ("Conventions"): it gets a reply."""
    name = b"n" * STRING_MAX
    with s.negotiated(server) as client:
        outcome = o.option_outcome(client, Opt.INFO, m.pack_name_and_infos(name))
    expect(
        outcome not in ("disconnect",) and not outcome.startswith("no reply"),
        "NBD_OPT_INFO with a 4096-byte name",
        "a reply",
        outcome,
    )


@spec(
    "Values / Handshake phase / Option types",
    MUST,
    "If the chosen export does not exist or requirements for the chosen export are not met (e.g., "
    "the client did not initiate TLS for an export where the server requires it), the server MUST "
    "terminate the session.",
)
def test_export_name_of_unknown_export_terminates(start_server):
    """A server serving one named export: NBD_OPT_EXPORT_NAME naming another gets no export
    information; the connection is closed (it cannot be answered with an error)."""
    server = start_server(ServerConfig(export_name="conformance"))
    if s.tls_context(server) is not None:
        unsupported("NBD_OPT_EXPORT_NAME in clear to a TLS server is test_tls's")
    with s.negotiated(server) as client:
        try:
            client.send_option(Opt.EXPORT_NAME, b"conformance-no-such-export")
        except Disconnected:
            return
        outcome = client.expect_disconnect(5.0)
    expect(
        outcome.disconnected and not outcome.data,
        "NBD_OPT_EXPORT_NAME naming an unknown export",
        "the session terminated, no export information",
        f"disconnected={outcome.disconnected}, {len(outcome.data)} bytes sent",
    )
    s.assert_still_serving(server, "NBD_OPT_EXPORT_NAME naming an unknown export")
