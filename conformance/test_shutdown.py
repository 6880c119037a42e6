"""A server shutting down: requests in flight answered, then ESHUTDOWN; options errored.

"Protocol phases / Transmission / Terminating the transmission phase" and
"... / Termination of the session during option haggling": a server being
shut down SHOULD answer the requests it has before it closes, with
NBD_ESHUTDOWN where it errors them, and SHOULD error options with
NBD_REP_ERR_SHUTDOWN.  These checks send SIGTERM to a server the suite
started (UNSUPPORTED otherwise) while a client has requests in flight or is
negotiating.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from conformance.server_process import alive, server_process
from conformance.servers.base import ServerConfig
from conformance.spec import SHOULD, expect, spec
from conformance.wire import Cmd, Disconnected, Errno, Opt, ProtocolViolation, Rep
from conformance.wire import messages as m
from conformance.wire import session as s

TERMINATING = "Protocol phases / Transmission / Terminating the transmission phase"
HAGGLING = "Protocol phases / Handshake / Termination of the session during option haggling"
IN_FLIGHT = 16
READ_LENGTH = 256 * 1024
WAIT = 10.0

pytestmark = pytest.mark.disruptive


@pytest.fixture
def doomed_server(start_server):
    """A server of its own: the check ends it."""
    return start_server(ServerConfig(shared=0))


def _terminate(server) -> int:
    """SIGTERM the server (the suite expects it to exit); its pid."""
    pid, _ = server_process(server)
    server.expect_exit()
    os.kill(pid, signal.SIGTERM)
    return pid


def _shutdown_with_reads_in_flight(server, *, extra_read: bool):
    """16 READs of 256 KiB in one write; SIGTERM once the first reply has come; then, with
    EXTRA_READ, one more READ.  Returns (replies to the 16 before the end, the extra READ's
    reply or None, why the reading stopped, the server's pid)."""
    client, _ = s.transmission(server)
    try:
        cookies = [0xFEDCBA9876543210 - i for i in range(IN_FLIGHT)]
        batch = b""
        for i, cookie in enumerate(cookies):
            client._read_lengths[cookie] = READ_LENGTH
            batch += m.pack_request(Cmd.READ, i * 4096, READ_LENGTH, cookie=cookie)
        client.send(batch)
        replies = [client.recv_message()]
        pid = _terminate(server)
        extra = 0x0123456789ABCDEF
        extra_reply: m.SimpleReply | m.Chunk | None = None
        if extra_read:
            with contextlib.suppress(Disconnected):
                client.send_request(Cmd.READ, 0, 4096, cookie=extra)
        else:
            extra_reply = m.SimpleReply(Errno.OK, extra)  # none is awaited
        stopped = "all replies read"
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and (len(replies) < IN_FLIGHT or extra_reply is None):
            try:
                msg = client.recv_message()
            except (Disconnected, TimeoutError, ProtocolViolation) as exc:
                stopped = str(exc)
                break
            if msg.cookie == extra:
                extra_reply = msg
            else:
                replies.append(msg)
        return replies, extra_reply, stopped, pid
    finally:
        client.close()


@spec(
    TERMINATING,
    SHOULD,
    "On a server shutdown, the server SHOULD wait for inflight requests to be serviced prior to "
    "initiating a hard disconnect.",
)
def test_shutdown_answers_requests_in_flight(doomed_server):
    """SIGTERM while 15 READs of 256 KiB wait to be answered: each gets its whole reply (data
    or an error: the server MAY speed up with errors) before the connection ends."""
    replies, _, stopped, pid = _shutdown_with_reads_in_flight(doomed_server, extra_read=False)
    expect(
        len(replies) == IN_FLIGHT,
        "replies to READs in flight at SIGTERM",
        f"{IN_FLIGHT} whole replies",
        f"{len(replies)}, then {stopped}",
    )
    deadline = time.monotonic() + WAIT
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


@spec(
    TERMINATING,
    SHOULD,
    "The error value issued in respect of these requests and any subsequently received requests "
    "SHOULD be `NBD_ESHUTDOWN`.",
)
def test_errors_during_shutdown_are_eshutdown(doomed_server):
    """Every error the server answers after SIGTERM, to the READs in flight or to one sent
    after the signal, is NBD_ESHUTDOWN."""
    replies, extra, _, _ = _shutdown_with_reads_in_flight(doomed_server, extra_read=True)
    errors = [
        r.error.name
        for r in [*replies, *([extra] if extra is not None else [])]
        if isinstance(r, m.SimpleReply) and r.error != Errno.OK
    ]
    wrong = [e for e in errors if e != "ESHUTDOWN"]
    expect(not wrong, "errors answered during the shutdown", "NBD_ESHUTDOWN only", errors)


def _refusing(server, deadline: float) -> bool:
    """Wait until the server refuses new connections (its shutdown has begun), or DEADLINE."""
    while time.monotonic() < deadline:
        try:
            probe = server.open_socket(timeout=0.5)
        except OSError:
            return True
        probe.close()
        time.sleep(0.02)
    return False


@spec(
    HAGGLING,
    SHOULD,
    "SHOULD error further options received (other than an `NBD_OPT_ABORT`) with "
    "`NBD_REP_ERR_SHUTDOWN`.",
)
def test_options_during_shutdown_get_err_shutdown(doomed_server):
    """A client in option haggling when SIGTERM arrives: once the server refuses new
    connections, an NBD_OPT_INFO gets NBD_REP_ERR_SHUTDOWN (or the connection is closed), not
    a normal answer.  (NBD_OPT_INFO, because nbdkit answers a second NBD_OPT_LIST with
    NBD_REP_ERR_INVALID whatever the server's state.)"""
    client = s.negotiated(doomed_server)
    name = s.export_name(doomed_server)
    try:
        before = client.option(Opt.INFO, m.pack_name_and_infos(name))
        expect(before.ok, "NBD_OPT_INFO before the shutdown", "NBD_REP_ACK", before.describe())
        _terminate(doomed_server)
        _refusing(doomed_server, time.monotonic() + 5.0)
        try:
            client.send_option(Opt.INFO, m.pack_name_and_infos(name))
            result = client.recv_option_result()
        except (Disconnected, OSError):
            return  # closed: no option was received to be answered
        expect(
            result.type == Rep.ERR_SHUTDOWN,
            "reply to NBD_OPT_INFO during the shutdown",
            "NBD_REP_ERR_SHUTDOWN (or the connection closed)",
            result.describe(),
        )
    finally:
        client.close()
