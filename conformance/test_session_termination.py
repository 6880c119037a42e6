"""A server ends a session only where the spec lets it.

"Termination of the session during option haggling" and "Terminating the
transmission phase" list when a party may disconnect: the other party broke
a MUST, the client asked (NBD_OPT_ABORT, NBD_CMD_DISC), the server cannot
return an error (NBD_OPT_EXPORT_NAME), a denial of service, a shutdown.
Everything else must be answered.  No finite walk covers "everything else";
these checks walk every kind of *valid* request a client may make that a
server may refuse or find unusual (one of each option, one of each reply
path, an idle pause), so that a server with a habit of hanging up on what it
does not serve (an unknown export, an unknown option, a client that will not
start TLS, a quiet client) fails here.  Each step is named in the failure.
"""

from __future__ import annotations

import pytest

from conformance.servers import ServerConfig
from conformance.spec import MUST, SpecViolation, expect, spec, unsupported
from conformance.wire import (
    Cmd,
    CmdFlag,
    Disconnected,
    Errno,
    Info,
    Opt,
    ProtocolViolation,
    TransmissionFlag,
)
from conformance.wire import messages as m
from conformance.wire import outcomes as o
from conformance.wire import session as s

HAGGLING = "Protocol phases / Handshake / Termination of the session during option haggling"
TERMINATING = "Protocol phases / Transmission / Terminating the transmission phase"
#: An option number no option has (Values / Handshake phase / Option types).
UNKNOWN_OPTION = 0x7A7A
#: An information type no NBD_INFO has.
UNKNOWN_INFO = 0x7A7A
NO_SUCH_EXPORT = b"conformance-no-such-export"
#: Refusals an unwelcome client is sent: well below any plausible denial of service
#: (nbdkit, for one, allows 32 options on a connection).
REFUSALS = 16
#: Seconds a client stays idle in transmission before its next request.
IDLE = 2.0


def _answered(client, step: str, option: int, data: bytes = b"", *, wait: float = o.WAIT):
    """The final reply to OPTION; a SpecViolation naming STEP if the server hung up instead."""
    try:
        client.send_option(option, data)
    except (Disconnected, OSError) as exc:
        raise SpecViolation(step, "a reply", f"the connection closed ({exc})") from None
    outcome = o.final_option_reply(client, wait)
    if isinstance(outcome, str):
        raise SpecViolation(
            step, "a reply", f"{o.describe(outcome)}\nwire log:\n{client.transcript()}"
        )
    return outcome


@spec(
    HAGGLING,
    MUST,
    "A party MUST NOT initiate a hard disconnect save where set out in this section.",
)
def test_every_kind_of_option_is_answered_not_hung_up_on(server):
    """One connection, each kind of option a client may send and a server may refuse: an
    unknown option, INFO and GO for an export that does not exist, INFO asking an unknown
    information type, LIST, STARTTLS where TLS is not offered, STRUCTURED_REPLY, context
    queries in an unknown namespace, EXTENDED_HEADERS.  Each gets a reply, whatever it says;
    then GO on the real export still succeeds and a READ is answered."""
    name = s.export_name(server)
    client = s.negotiated(server)
    try:
        steps: list[tuple[str, int, bytes]] = [
            (f"an unknown option ({UNKNOWN_OPTION:#x})", UNKNOWN_OPTION, b""),
            (
                "NBD_OPT_INFO for an export that does not exist",
                Opt.INFO,
                m.pack_name_and_infos(NO_SUCH_EXPORT),
            ),
            # NBD_OPT_GO for it comes next, unless INFO found the server serves any name.
            (
                "NBD_OPT_INFO asking an unknown information type",
                Opt.INFO,
                m.pack_name_and_infos(name, (Info.BLOCK_SIZE, UNKNOWN_INFO)),
            ),
            ("NBD_OPT_LIST", Opt.LIST, b""),
        ]
        if getattr(server, "tls_dir", None) is None:
            # Where TLS is offered STARTTLS would be accepted; that is test_tls's.
            steps.append(("NBD_OPT_STARTTLS to a server without TLS", Opt.STARTTLS, b""))
        for step, option, data in steps:
            result = _answered(client, step, option, data)
            unknown_name_refused = data == m.pack_name_and_infos(NO_SUCH_EXPORT) and not result.ok
            if unknown_name_refused:  # where INFO succeeds a GO would too: not sent then
                _answered(
                    client,
                    "NBD_OPT_GO for an export that does not exist",
                    Opt.GO,
                    m.pack_name_and_infos(NO_SUCH_EXPORT),
                )
        structured = _answered(client, "NBD_OPT_STRUCTURED_REPLY", Opt.STRUCTURED_REPLY)
        if structured.ok:
            client.structured = True
            query = m.pack_meta_context_query(name, (b"x-conformance-none:",))
            _answered(
                client,
                "NBD_OPT_LIST_META_CONTEXT in an unknown namespace",
                Opt.LIST_META_CONTEXT,
                query,
            )
            _answered(
                client,
                "NBD_OPT_SET_META_CONTEXT in an unknown namespace",
                Opt.SET_META_CONTEXT,
                query,
            )
        extended = _answered(client, "NBD_OPT_EXTENDED_HEADERS", Opt.EXTENDED_HEADERS)
        client.extended = extended.ok
        go = _answered(
            client,
            "NBD_OPT_GO on the export after all the above",
            Opt.GO,
            m.pack_name_and_infos(name, (Info.BLOCK_SIZE,)),
        )
        expect(go.ok, "NBD_OPT_GO on the export after all the above", "NBD_REP_ACK", go.describe())
        client.transmitting = True
        sizes = go.block_size
        length = max(512, sizes.minimum if sizes else 1)
        what = "a READ after every kind of option"
        try:
            reply = client.reply(client.send_request(Cmd.READ, 0, length))
        except (Disconnected, TimeoutError, ProtocolViolation) as exc:
            raise SpecViolation(what, detail=f"expected a reply, actual {exc}") from None
        expect(reply.error == Errno.OK, what, "success", reply.error.name)
    finally:
        client.close()


@pytest.mark.parametrize("why", ["no-such-export", "tls-not-started"])
@spec(
    HAGGLING,
    MUST,
    "In the server's case it MUST (save where set out above) simply error inbound options "
    "until the client gets the hint that it is unwelcome, except that if a server believes a "
    "client's behaviour constitutes a denial of service",
)
def test_an_unwelcome_client_gets_errors_not_a_hang_up(start_server, why):
    """A client the server will not serve keeps asking: NBD_OPT_GO and NBD_OPT_INFO for an
    export that does not exist, or (FORCEDTLS) LIST, INFO and GO without starting TLS.  Each
    of 16 options gets an error reply, and the connection stays open to the last; then
    NBD_OPT_ABORT, which the server may answer or close on."""
    if why == "no-such-export":
        server = start_server()
        asks = [(Opt.INFO, NO_SUCH_EXPORT), (Opt.GO, NO_SUCH_EXPORT)]
    else:
        server = start_server(ServerConfig(tls=True))
        name = s.export_name(server)
        asks = [(Opt.LIST, None), (Opt.INFO, name), (Opt.GO, name)]
    client = s.connect(server)
    try:
        client.negotiate()  # in clear: a FORCEDTLS server's client stays unwelcome
        for n in range(REFUSALS):
            option, export = asks[n % len(asks)]
            data = b"" if export is None else m.pack_name_and_infos(export)
            step = f"refusal {n + 1} of {REFUSALS}: {Opt(option).name} ({why})"
            result = _answered(client, step, option, data)
            if n == 0 and result.ok and why == "no-such-export":
                unsupported("the server serves any export name: no name makes a client unwelcome")
            expect(result.final.is_error, step, "an error reply", result.describe())
        client.abort()
    finally:
        client.close()


@spec(
    TERMINATING,
    MUST,
    "The client and the server MUST NOT initiate any form of disconnect other than in one "
    "of the above circumstances.",
)
def test_valid_requests_and_a_pause_do_not_end_transmission(server):
    """One connection, each kind of valid request with each reply path the export offers:
    cookies 0 and 2^64-1 and a cookie reused once its reply came, a READ of the last byte
    (or minimum block) and one of 1 MiB (or the maximum payload), FLUSH, FUA on a READ,
    CACHE, BLOCK_STATUS with NBD_CMD_FLAG_REQ_ONE, each where advertised, and a quiet pause
    of 2 s.  Each is answered and the connection stays open; then NBD_CMD_DISC."""
    try:
        client, go = s.transmission_and_go(
            server, structured=True, meta_contexts=(b"base:allocation",)
        )
        contexts = True
    except ProtocolViolation:
        client, go = s.transmission_and_go(server)
        contexts = False
    export = go.export
    assert export is not None, "NBD_OPT_GO succeeded without NBD_INFO_EXPORT"
    flags = export.flags
    # Requests keep to the sizes the server advertised ("Size constraints": breaking
    # them is a client's MUST, for which a server MAY hang up).
    sizes = go.block_size
    unit = max(512, sizes.minimum if sizes else 1)
    big = min(1 << 20, sizes.maximum if sizes else 1 << 25, export.size)
    big -= big % unit
    last = unit if sizes and sizes.minimum > 1 else 1

    def answered(step: str, cmd: int, cmd_flags: int, offset: int, length: int, cookie: int):
        try:
            reply = client.reply(
                client.send_request(cmd, offset, length, flags=cmd_flags, cookie=cookie)
            )
        except (Disconnected, TimeoutError, ProtocolViolation, OSError) as exc:
            raise SpecViolation(
                step, "a reply", f"{exc}\nwire log:\n{client.transcript()}"
            ) from None
        expect(reply.error == Errno.OK, step, "success", reply.error.name)

    try:
        steps = [
            ("a READ with cookie 0", Cmd.READ, 0, 0, unit, 0),
            ("a READ with cookie 2^64-1", Cmd.READ, 0, 0, unit, (1 << 64) - 1),
            ("a READ reusing cookie 0 after its reply", Cmd.READ, 0, 4 * unit, unit, 0),
            ("a READ of the last block", Cmd.READ, 0, export.size - last, last, 1),
            (f"a READ of {big} bytes", Cmd.READ, 0, 0, big, 2),
        ]
        if flags & TransmissionFlag.SEND_FLUSH:
            steps.append(("NBD_CMD_FLUSH", Cmd.FLUSH, 0, 0, 0, 3))
        if flags & TransmissionFlag.SEND_FUA:
            steps.append(("a READ with NBD_CMD_FLAG_FUA", Cmd.READ, CmdFlag.FUA, 0, unit, 4))
        if flags & TransmissionFlag.SEND_CACHE:
            steps.append(("NBD_CMD_CACHE", Cmd.CACHE, 0, 0, 8 * unit, 5))
        if contexts:
            steps.append(
                (
                    "NBD_CMD_BLOCK_STATUS with NBD_CMD_FLAG_REQ_ONE",
                    Cmd.BLOCK_STATUS,
                    CmdFlag.REQ_ONE,
                    0,
                    big,
                    6,
                )
            )
        for step in steps:
            answered(*step)
        how, data = s.wait_for_close(client, IDLE)
        expect(
            how == "open",
            f"the connection during a quiet pause of {IDLE}s",
            "open",
            f"{how} (after {len(data)} unexpected bytes)",
        )
        answered("a READ after the pause", Cmd.READ, 0, 0, unit, 7)
    finally:
        client.disconnect()
        client.close()
