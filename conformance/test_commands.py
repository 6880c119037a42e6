"""Requests a server may not expect: unknown commands and flags, NBD_CMD_DISC, NBD_CMD_CACHE.

Raw-wire checks (conformance.wire): libnbd will not send an unknown command
or flag, and hides when the server closes after NBD_CMD_DISC.  Cookies are
full 64-bit values, so that a server that keeps only part of one fails here
too.
"""

from __future__ import annotations

import contextlib

import pytest

from conformance.servers.base import ServerConfig
from conformance.spec import (
    MUST,
    SHOULD,
    SpecViolation,
    expect,
    expect_data,
    expect_equal,
    spec,
    unsupported,
)
from conformance.wire import (
    Cmd,
    CmdFlag,
    Disconnected,
    Errno,
    ProtocolViolation,
    TransmissionFlag,
)
from conformance.wire import messages as m
from conformance.wire import session as s

ERRORS = "Values / Transmission phase / Error values"
REQUESTS = "Values / Transmission phase / Request types"
TERMINATING = "Protocol phases / Transmission / Terminating the transmission phase"

COOKIE = 0xFEDCBA9876543210
#: Numbers no command or command flag has (Values / Transmission phase).
UNKNOWN_COMMAND = 0x3F
UNKNOWN_FLAG = 1 << 13
WAIT = 5.0


def _error_of(client, cookie: int, what: str) -> Errno:
    """The error the server answered COOKIE with (OK for success), read message by message."""
    error = Errno.OK
    while True:
        try:
            msg = client.recv_message()
        except (Disconnected, TimeoutError, ProtocolViolation) as exc:
            raise SpecViolation(what, detail=f"expected a reply, actual {exc}") from None
        expect_equal(hex(msg.cookie), hex(cookie), f"cookie of the reply to {what}")
        if isinstance(msg, m.SimpleReply):
            return msg.error
        if msg.type.is_error and error == Errno.OK:
            parsed = m.parse_chunk(msg)
            assert isinstance(parsed, m.ChunkError)
            error = parsed.error
        if msg.done:
            return error


@contextlib.contextmanager
def _session(server, replies: str):
    """A raw client in transmission with simple or structured replies."""
    client, export = s.transmission_with(server, replies)
    try:
        yield client, export
    finally:
        client.close()


def _each_session(server):
    """(replies, client, export) with simple replies, then structured replies where offered."""
    for replies in ("simple", "structured"):
        try:
            with _session(server, replies) as (client, export):
                yield replies, client, export
        except pytest.skip.Exception:
            if replies == "simple":
                raise


# ----------------------------------------------------------- unknown requests


@spec(ERRORS, SHOULD, "The server SHOULD return `NBD_EINVAL` if it receives an unknown command.")
def test_unknown_command_gets_einval(server):
    """Command 0x3f, no payload, with simple and with structured replies: NBD_EINVAL, and the
    connection goes on."""
    for replies, client, _ in _each_session(server):
        what = f"unknown command {UNKNOWN_COMMAND:#x} ({replies} replies)"
        client.send_request(UNKNOWN_COMMAND, 0, 0, cookie=COOKIE)
        error = _error_of(client, COOKIE, what)
        expect_equal(error.name, "EINVAL", f"error of {what}")
        s.assert_still_answers(client, what, cookie=COOKIE ^ 0xFF)


@spec(
    ERRORS, SHOULD, "The server SHOULD return `NBD_EINVAL` if it receives an unknown command flag."
)
def test_unknown_command_flag_gets_einval(server):
    """Flag bit 13 (no flag has it) on a READ and (where advertised) a FLUSH: NBD_EINVAL."""
    with _session(server, "simple") as (client, export):
        commands = [Cmd.READ]
        if export.flags & TransmissionFlag.SEND_FLUSH:
            commands.append(Cmd.FLUSH)
        for cmd in commands:
            length = 0 if cmd == Cmd.FLUSH else 512
            client.send_request(cmd, 0, length, flags=UNKNOWN_FLAG, cookie=COOKIE)
            # A READ refused in a simple reply carries no payload (checked elsewhere).
            client._read_lengths.pop(COOKIE, None)
            what = f"{cmd.name} with flag {UNKNOWN_FLAG:#x}"
            error = _error_of(client, COOKIE, what)
            expect_equal(error.name, "EINVAL", f"error of {what}")
            s.assert_still_answers(client, what, cookie=COOKIE ^ 0xFF)


# ------------------------------------------------------------------ NBD_CMD_DISC

IN_FLIGHT = 64
READ_LENGTH = 4096
#: A second volume: more reply bytes than a socket buffer holds, so that a server
#: that closes once nothing is in flight, with replies still queued, is caught.
LARGE_IN_FLIGHT = 16
LARGE_READ_LENGTH = 256 * 1024


def _reads_then_disc(server, count: int, length: int):
    """COUNT READs of LENGTH bytes and NBD_CMD_DISC sent back to back: (client, cookies)."""
    client, _ = s.transmission(server)
    cookies = [COOKIE - i for i in range(count)]
    requests = b""
    for i, cookie in enumerate(cookies):
        client._read_lengths[cookie] = length
        requests += m.pack_request(Cmd.READ, i * 4096, length, cookie=cookie)
    requests += m.pack_request(Cmd.DISC, 0, 0, cookie=COOKIE + 1)
    client.log.append(f"C: {count} READs of {length} bytes, then DISC, in one write")
    client.send(requests)
    return client, cookies


def check_disc_answers_in_flight(server, count: int = IN_FLIGHT, length: int = READ_LENGTH):
    """COUNT READs and NBD_CMD_DISC in one write: COUNT whole replies, then the end.

    The suite runs it with 64 READs of 4 KiB, then with 16 READs of 256 KiB (more than a
    socket buffer holds); tests/test_wire_checks_can_fail.py runs the second against the
    reference server from its command line.
    """
    client, cookies = _reads_then_disc(server, count, length)
    try:
        answered: list[int] = []
        for _ in cookies:
            try:
                msg = client.recv_message()
            except (Disconnected, TimeoutError, ProtocolViolation) as exc:
                raise SpecViolation(
                    "READs in flight when NBD_CMD_DISC arrived",
                    detail=f"expected {count} replies, actual {len(answered)} and then {exc}",
                ) from None
            answered.append(msg.cookie)
        expect_equal(sorted(answered), sorted(cookies), "cookies of the replies before the close")
        _expect_clean_close(client, "after the replies to the requests before NBD_CMD_DISC")
    finally:
        client.close()


@pytest.fixture(params=["clear", "tls"])
def disc_server(request, start_server):
    return start_server(ServerConfig(tls=request.param == "tls"))


@spec(
    REQUESTS,
    MUST,
    "The server MUST handle all outstanding requests, shut down the TLS session (if one is "
    "running), and close the TCP session.",
)
def test_disc_answers_requests_in_flight_then_closes(disc_server):
    """64 READs and NBD_CMD_DISC in one write: 64 whole replies, then the end; then the same
    with 16 READs of 256 KiB, more than the socket holds, so replies wait in the server.

    "Handle" is read as "answer": a reply with an error (nbdkit answers NBD_ESHUTDOWN) is
    accepted; a reply cut short, or none, is not."""
    check_disc_answers_in_flight(disc_server)
    check_disc_answers_in_flight(disc_server, LARGE_IN_FLIGHT, LARGE_READ_LENGTH)


@spec(
    TERMINATING,
    MUST,
    "The client sends `NBD_CMD_DISC` whereupon the server MUST close down the TLS session (if one "
    "is running) and then close the TCP connection.",
)
def test_disc_closes_the_connection(disc_server):
    """NBD_CMD_DISC alone: no reply, TLS closed with close_notify if running, then the end."""
    client, _ = s.transmission(disc_server)
    try:
        client.send_request(Cmd.DISC, 0, 0, cookie=COOKIE)
        _expect_clean_close(client, "after NBD_CMD_DISC")
    finally:
        client.close()


def _expect_clean_close(client, when: str) -> None:
    """The server sends nothing more and closes within WAIT; over TLS, close_notify first."""
    how, data = s.wait_for_close(client, WAIT)
    if how == "open":
        raise SpecViolation(
            f"the connection {when}", detail=f"expected closed, actual open after {WAIT}s"
        )
    if how == "no close_notify":
        raise SpecViolation(
            f"the TLS session {when}",
            detail="expected a TLS close_notify before the TCP close, actual a bare TCP close",
        )
    expect_equal(data, b"", f"bytes the server sent {when}")


# --------------------------------------------------------------- NBD_CMD_CACHE


def _cache_session(server):
    client, export = s.transmission(server)
    if not export.flags & TransmissionFlag.SEND_CACHE:
        client.close()
        unsupported("the server does not advertise NBD_FLAG_SEND_CACHE")
    return client, export


@spec(
    REQUESTS,
    MUST,
    "however, if it advertised the command, the server MUST reject any command flags it does "
    "not recognize.",
)
def test_cache_with_unknown_flag_is_rejected(server):
    """NBD_CMD_CACHE with flag bit 13, then bit 15 (no flag has either): an error each time."""
    client, _ = _cache_session(server)
    try:
        for flag in (UNKNOWN_FLAG, 1 << 15):
            client.send_request(Cmd.CACHE, 0, 4096, flags=flag, cookie=COOKIE)
            error = _error_of(client, COOKIE, f"NBD_CMD_CACHE with flag {flag:#x}")
            expect(error != Errno.OK, f"NBD_CMD_CACHE with flag {flag:#x}", "an error", "success")
    finally:
        client.close()


@spec(
    REQUESTS,
    MUST,
    "If an error occurs, the server MUST set the appropriate error code in the error field.",
)
def test_cache_error_is_a_defined_error_value(server):
    """A cache straddling the end of the export may fail; if it does, with a value the spec
    defines (an error code, not an arbitrary number) and without disturbing the connection."""
    client, export = _cache_session(server)
    try:
        client.send_request(Cmd.CACHE, export.size - 4096, 8192, cookie=COOKIE)
        error = _error_of(client, COOKIE, "NBD_CMD_CACHE across the end")
        if error == Errno.OK:
            unsupported("the server accepted a cache across the end of the export (no error)")
        expect(
            not error.name.startswith("UNKNOWN"),
            "error of NBD_CMD_CACHE across the end",
            "an error value of 'Error values'",
            error.name,
        )
        s.assert_still_answers(client, "a failed NBD_CMD_CACHE", cookie=COOKIE ^ 0xFF)
    finally:
        client.close()


@spec(
    REQUESTS,
    MUST,
    "However failure on this operation does not imply that further read and write requests on "
    "this area will fail, and, other than any difference in performance, there MUST NOT be any "
    "difference in semantics compared to if the client had not used this command.",
)
@pytest.mark.writes
def test_cache_changes_no_data(server):
    """Write, CACHE, read; overwrite, read: a cache never serves the old bytes, and the area
    stays readable and writable whether the cache succeeded or not."""
    client, _ = _cache_session(server)
    offset, length = 1 << 20, 65536
    first, second = b"\x11" * length, bytes(range(256)) * (length // 256)
    try:
        expect_equal(client.write(offset, first).error, Errno.OK, "WRITE before the cache")
        client.send_request(Cmd.CACHE, offset, length, cookie=COOKIE)
        _error_of(client, COOKIE, "NBD_CMD_CACHE")
        reply = client.read(offset, length)
        expect_equal(reply.error, Errno.OK, "READ of a cached area")
        expect_data(reply.data(offset, length), first, "READ of a cached area")
        expect_equal(
            client.write(offset + 512, second[:4096]).error, Errno.OK, "WRITE into a cached area"
        )
        reply = client.read(offset, length)
        expect_equal(reply.error, Errno.OK, "READ after a WRITE into a cached area")
        want = first[:512] + second[:4096] + first[512 + 4096 :]
        expect_data(reply.data(offset, length), want, "READ after a WRITE into a cached area")
    finally:
        client.close()


# ------------------------------------------------------- advertised features work

#: flag -> (what, command, command flags, offset, length, errors the spec lets it answer)
FEATURES = {
    TransmissionFlag.SEND_FLUSH: ("FLUSH", Cmd.FLUSH, 0, 0, 0, ()),
    TransmissionFlag.SEND_FUA: ("WRITE with NBD_CMD_FLAG_FUA", Cmd.WRITE, CmdFlag.FUA, 0, 4096, ()),
    TransmissionFlag.SEND_TRIM: ("TRIM", Cmd.TRIM, 0, 0, 4096, ()),
    TransmissionFlag.SEND_WRITE_ZEROES: ("WRITE_ZEROES", Cmd.WRITE_ZEROES, 0, 0, 4096, ()),
    TransmissionFlag.SEND_FAST_ZERO: (
        "WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO",
        Cmd.WRITE_ZEROES,
        CmdFlag.FAST_ZERO,
        0,
        4096,
        (Errno.ENOTSUP,),  # "MUST fail quickly with NBD_ENOTSUP unless ..."
    ),
    # "A server MAY advertise NBD_FLAG_SEND_CACHE even if the command has no effect or always
    # fails with NBD_EINVAL".
    TransmissionFlag.SEND_CACHE: ("CACHE", Cmd.CACHE, 0, 0, 4096, (Errno.EINVAL,)),
}


@spec(
    "Values / Handshake phase / Flag fields / Transmission flags",
    MUST,
    "The server MUST NOT set the flag for features it does not support.",
)
@pytest.mark.writes
def test_advertised_features_are_supported(server):
    """Every command an advertised flag announces (FLUSH, FUA, TRIM, WRITE_ZEROES, FAST_ZERO,
    CACHE, DF), used as the spec describes, is served, not refused as unknown (NBD_EINVAL or
    NBD_ENOTSUP), except where the spec names the refusal."""
    for replies, client, export in _each_session(server):
        if export.flags & TransmissionFlag.READ_ONLY:
            unsupported("the export is read-only")
        used = []
        for flag, (what, cmd, flags, offset, length, allowed) in FEATURES.items():
            if not export.flags & flag:
                continue
            payload = b"\x42" * length if cmd == Cmd.WRITE else b""
            cookie = client.send_request(
                cmd, offset, length, flags=flags, cookie=COOKIE - flag, payload=payload
            )
            error = _error_of(client, cookie, what)
            expect(
                error == Errno.OK or error in allowed,
                f"{what} (advertised by NBD_FLAG_{flag.name}; {replies} replies)",
                "success" + "".join(f" or {e.name}" for e in allowed),
                error.name,
            )
            used.append(what)
        if replies == "structured" and export.flags & TransmissionFlag.SEND_DF:
            client.send_request(Cmd.READ, 0, 4096, flags=CmdFlag.DF, cookie=COOKIE)
            error = _error_of(client, COOKIE, "READ with NBD_CMD_FLAG_DF")
            expect_equal(error.name, "OK", "READ with NBD_CMD_FLAG_DF (advertised)")
            used.append("DF")
        if not used:
            unsupported("the server advertises none of these features")
