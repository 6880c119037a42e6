"""Regression checks for bugs real NBD servers shipped, each named after its CVE.

Every check drives the hostile interaction over the raw wire, judges what the
spec lets the server answer, and then proves the server still serves a
well-behaved client (conformance.wire.session.assert_still_serving).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import time

import pytest

from conformance.servers.base import ServerConfig
from conformance.spec import MUST, SHOULD, expect, expect_equal, spec, unsupported
from conformance.wire import Cmd, Disconnected, Errno, Info, Opt, Rep
from conformance.wire import messages as m
from conformance.wire import session as s
from conformance.wire.constants import STRING_MAX

# Reproducers of crashes and hangs: against a server the suite did not start
# they run only with --allow-disruptive.
pytestmark = pytest.mark.disruptive

WAIT = 5.0
STRING_RULE = "MUST be no longer than 4096 bytes."


def _outcome(client, receive):
    """What RECEIVE() got within WAIT seconds, or 'disconnect', or 'no reply'."""
    client.sock.settimeout(WAIT)
    try:
        return receive()
    except Disconnected:
        return "disconnect"
    except TimeoutError:
        return "no reply"
    finally:
        with contextlib.suppress(OSError):
            client.sock.settimeout(client.timeout)


def _final_reply_or_close(client):
    """The final reply to the option just sent, 'disconnect', or 'no reply'."""
    return _outcome(client, client.recv_option_result)


def _describe(outcome) -> str:
    return outcome if isinstance(outcome, str) else outcome.describe()


def _error_or_close(outcome) -> bool:
    return outcome == "disconnect" or (not isinstance(outcome, str) and outcome.final.is_error)


# ----------------------------------------------------------- CVE-2021-3716


@pytest.fixture
def tls_server(start_server):
    return start_server(ServerConfig(tls=True))


@spec(
    "Values / Handshake phase / Option types",
    MUST,
    "When this command succeeds, the server MUST NOT preserve any negotiation state (such as a "
    "request for `NBD_OPT_STRUCTURED_REPLY`, or metadata contexts from "
    "`NBD_OPT_SET_META_CONTEXT`) issued before this command.",
)
@pytest.mark.parametrize("state", ["structured-reply", "meta-context", "extended-headers"])
def test_cve_2021_3716_plaintext_state_does_not_survive_starttls(tls_server, state):
    """nbdkit kept NBD_OPT_STRUCTURED_REPLY negotiated in plaintext across STARTTLS.  The same
    for NBD_OPT_EXTENDED_HEADERS (the extension's version of the sentence names it)."""
    name = s.export_name(tls_server)
    client = s.connect(tls_server)
    try:
        client.negotiate()
        if state == "extended-headers":
            client.option(Opt.EXTENDED_HEADERS)
        client.option(Opt.STRUCTURED_REPLY)
        client.set_meta_context(name, (b"base:allocation",))
        expect_equal(
            client.starttls(s.require_tls_context(tls_server)).type.name, "ACK", "STARTTLS"
        )
        if state == "meta-context" and client.structured_reply().type != Rep.ACK:
            unsupported("the server does not support NBD_OPT_STRUCTURED_REPLY")
        expect_equal(client.go(name).type.name, "ACK", "NBD_OPT_GO over TLS")
        if state in ("structured-reply", "extended-headers"):
            reply = client.read(0, 512)
            expect(
                reply.is_simple,
                "READ reply after STARTTLS without STRUCTURED_REPLY over TLS",
                "a simple reply",
                [type(x).__name__ for x in reply.messages],
            )
        else:
            reply = client.block_status(0, 4096)
            expect(
                not reply.block_status,
                "BLOCK_STATUS with contexts chosen only in clear",
                "no status chunk (contexts were dropped)",
                reply.block_status,
            )
        client.disconnect()
    finally:
        client.close()


# --------------------------------------------------------- CVE-2017-15118


def _send_name(server, option: Opt, name: bytes):
    client = s.negotiated(server)
    try:
        if option == Opt.EXPORT_NAME:
            client.send_option(Opt.EXPORT_NAME, name)
            client.sock.settimeout(WAIT)
            try:
                client.recv_exactly(10, "export information")
                return "entered transmission"
            except Disconnected:
                return "disconnect"
            except TimeoutError:
                return "no reply"
        client.send_option(option, m.pack_name_and_infos(name, (Info.NAME,)))
        return _final_reply_or_close(client)
    except Disconnected:
        return "disconnect"
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
                _describe(outcome),
            )
        else:
            expect(
                _error_or_close(outcome),
                f"{option.name} with a {length}-byte name",
                "an error reply or a disconnect",
                _describe(outcome),
            )
    expect(
        outcome != "no reply",
        f"{option.name} with a {length}-byte name",
        "an answer",
        f"nothing within {WAIT}s",
    )
    s.assert_still_serving(server, f"{option.name} with a {length}-byte export name")


# ------------------------------------------------- CVE-2022-26495 / 26496


@spec("Values / Handshake phase / Option types", MUST)
@pytest.mark.parametrize("name_length", [0xFFFFFFFF, 0xFFFFFFFA, 0x80000000], ids=hex)
@pytest.mark.parametrize("option", [Opt.INFO, Opt.GO], ids=lambda o: o.name)
def test_cve_2022_26495_name_length_overflow(server, option, name_length):
    """nbd-server allocated name_length + 1 bytes (0 after overflow) and wrote into it."""
    client = s.negotiated(server)
    try:
        client.send_option(option, m.pack_name_and_infos(b"x" * 8, (), name_length=name_length))
        outcome = _final_reply_or_close(client)
    except Disconnected:
        outcome = "disconnect"
    finally:
        client.close()
    expect(
        _error_or_close(outcome),
        f"{option.name} with name length {name_length:#x}",
        "an error reply or a disconnect",
        _describe(outcome),
    )
    s.assert_still_serving(server, f"{option.name} with name length {name_length:#x}")


@spec("Conventions", MUST)
@pytest.mark.parametrize("length", [8192, 1 << 20])
@pytest.mark.parametrize("option", [Opt.INFO, Opt.GO], ids=lambda o: o.name)
def test_cve_2022_26496_oversized_name(server, option, length):
    """nbd-server copied an attacker-sized name into a stack buffer."""
    outcome = _send_name(server, option, b"n" * length)
    expect(
        _error_or_close(outcome),
        f"{option.name} with a {length}-byte name",
        "an error reply or a disconnect",
        _describe(outcome),
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
            client.expect_disconnect(WAIT)
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
    client = s.negotiated(server)
    try:
        client.send_option(option, b"\0" * 64, length=HUGE)
        outcome = _final_reply_or_close(client)
    except Disconnected:
        outcome = "disconnect"
    finally:
        client.close()
    expect(
        _error_or_close(outcome),
        f"option {option.name} claiming {HUGE} bytes",
        "an error reply or a disconnect",
        _describe(outcome),
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


# ----------------------------------------------- CVE-2005-3534, CVE-2011-0530

MARKER = b"conformance-marker" * 228  # 4104 bytes


def _mark(server) -> int:
    """Write MARKER near the end of the export (a clean session); return its offset."""
    client, export = s.transmission(server)
    try:
        offset = export.size - 2 * 4096
        expect_equal(client.write(offset, MARKER).error, Errno.OK, "WRITE of a marker")
        return offset
    finally:
        client.disconnect()


def _reply_or_close(client, cookie: int):
    """The reply to request COOKIE, 'disconnect', or 'no reply'."""
    return _outcome(client, lambda: client.reply(cookie))


@spec("Size constraints", MUST)
@pytest.mark.writes
@pytest.mark.parametrize("cmd", [Cmd.READ, Cmd.WRITE], ids=lambda c: c.name)
def test_cve_2005_3534_request_length_beyond_buffer(server, cmd):
    """nbd-server copied a request of any length into a fixed buffer.  A 4 GiB READ/WRITE gets
    an error or a hard disconnect, never data; other data and other clients are unaffected."""
    offset = _mark(server)
    client, _ = s.transmission(server)
    try:
        payload = b"\x5a" * (1 << 20) if cmd == Cmd.WRITE else b""
        cookie = client.send_request(cmd, 0, 0xFFFFFFFF, payload=payload)
        outcome = "disconnect" if cmd == Cmd.WRITE else _reply_or_close(client, cookie)
        if cmd == Cmd.READ:
            ok = outcome == "disconnect" or (not isinstance(outcome, str) and outcome.error)
            expect(
                ok,
                "READ of 0xffffffff bytes",
                "an error reply or a disconnect",
                outcome if isinstance(outcome, str) else outcome.error.name,
            )
    except Disconnected:
        pass
    finally:
        client.close()
    s.assert_still_serving(server, f"a {cmd.name} of 0xffffffff bytes", expect=(offset, MARKER))


@spec("Size constraints", MUST)
@pytest.mark.writes
def test_cve_2011_0530_write_larger_than_max_payload(server):
    """nbd-server 2.9.20 regressed CVE-2005-3534 for writes just over its buffer size.  A write
    of 2^25 + 4096 bytes (all sent) succeeds or fails cleanly; nothing else is disturbed."""
    offset = _mark(server)
    client, _ = s.transmission(server)
    length = (1 << 25) + 4096
    try:
        cookie = client.send_request(Cmd.WRITE, 0, length, payload=b"\x3c" * length)
        outcome = _reply_or_close(client, cookie)
        expect(
            outcome != "no reply",
            f"WRITE of {length} bytes",
            "a reply or a disconnect",
            f"nothing within {WAIT}s",
        )
    except Disconnected:
        pass
    finally:
        client.close()
    s.assert_still_serving(server, f"a WRITE of {length} bytes", expect=(offset, MARKER))


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
    client = s.negotiated(server)
    try:
        if option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            client.option(Opt.STRUCTURED_REPLY)
        client.send_option(option, _long_name_option(option))
        outcome = _final_reply_or_close(client)
    except Disconnected:
        outcome = "disconnect"
    finally:
        client.close()
    expect(
        not isinstance(outcome, str),
        f"{option.name} with 4096-byte strings",
        "an option reply",
        _describe(outcome),
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


# ----------------------------------------------------------- CVE-2024-7409

STALLED = 12


@pytest.fixture
def open_server(start_server):
    return start_server(ServerConfig(shared=0))


def _stall(server, count: int):
    """*count* connections stuck in negotiation at assorted points."""
    clients = []
    for i in range(count):
        client = s.connect(server)
        clients.append(client)
        with contextlib.suppress(Disconnected, OSError):
            if i % 3 >= 1:
                client.read_greeting()
            if i % 3 == 2:
                client.send_client_flags(1)
                client.send(m.pack_option(Opt.GO, b"")[:8])
    return clients


@spec(
    "Protocol phases / Handshake / Termination of the session during option haggling",
    SHOULD,
    "There is no requirement for the client or server to complete a negotiation if it does not "
    "wish to do so.",
)
def test_cve_2024_7409_stalled_negotiations_do_not_block_others(open_server):
    """Clients that never finish negotiating must not lock out a well-behaved one."""
    clients = _stall(open_server, STALLED)
    try:
        s.assert_still_serving(open_server, f"{STALLED} clients stalled in negotiation")
    finally:
        for client in clients:
            client.close()


def _alive(pid: int) -> bool:
    """True while *pid* runs (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _server_process(server):
    """(pid, exit-status getter) of the server the suite started, else UNSUPPORTED."""
    process = getattr(server, "process", None)
    daemon = getattr(server, "daemon_pid", None)
    if daemon is not None and _alive(daemon):
        return daemon, lambda: None  # not our child: its exit status is not ours to read
    if process is None or process.poll() is not None:
        unsupported("the suite does not hold the server's process (not started by the suite)")
    assert process is not None
    return process.pid, process.poll


@spec("Protocol phases / Transmission / Terminating the transmission phase", SHOULD)
def test_cve_2024_7409_shutdown_with_clients_connected(open_server):
    """qemu crashed (use after free) when shut down with clients still negotiating.  SIGTERM
    with clients in negotiation and in transmission: the server exits promptly, without a
    crash, and every client sees the connection end."""
    pid, exit_status = _server_process(open_server)
    clients = _stall(open_server, 4)
    active, _ = s.transmission(open_server)
    clients.append(active)
    try:
        expect_equal(active.read(0, 4096).error, Errno.OK, "READ before the shutdown")
        open_server.expect_exit()
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        expect(not _alive(pid), "server process after SIGTERM", "exited within 10s", "running")
        code = exit_status()
        expect(
            code in (None, 0, 1, -signal.SIGTERM, 128 + signal.SIGTERM),
            "exit status after SIGTERM",
            "a clean exit",
            code,
        )
        for i, client in enumerate(clients):
            outcome = client.expect_disconnect(2.0)
            expect(
                outcome.disconnected,
                f"client {i} after the server exited",
                "connection closed",
                "still open",
            )
    finally:
        for client in clients:
            client.close()


# ---------------------------------------------------------- CVE-2019-14850


@spec(
    "TLS support / Server-side requirements / FORCEDTLS mode",
    MUST,
    "If the server receives any other option, including `NBD_OPT_INFO` and unsupported options, "
    "it MUST reply with `NBD_REP_ERR_TLS_REQD` if TLS has not been initiated; `NBD_OPT_INFO` is "
    "included as in this mode, all exports are TLS-only.",
)
def test_cve_2019_14850_no_export_access_before_tls(tls_server):
    """nbdkit opened the backend for clients that had not completed TLS.  Backend work is not
    visible on the wire; what is: a burst of unauthenticated clients asking for the export in
    clear learns nothing about it, and the authenticated client is then served."""
    name = s.export_name(tls_server)
    clients = []
    try:
        for option in (Opt.INFO, Opt.GO) * 4:
            client = s.connect(tls_server)
            clients.append(client)
            client.negotiate()
            result = client.option(option, m.pack_name_and_infos(name, (Info.BLOCK_SIZE,)))
            expect_equal(
                result.describe().split("(")[0], "ERR_TLS_REQD", f"{option.name} before TLS"
            )
    finally:
        for client in clients:
            client.close()
    s.assert_still_serving(tls_server, "clients asking for the export before TLS")
