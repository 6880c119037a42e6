"""Every error a request can be made to fail with is a value of "Error values".

"If an error occurs, the server MUST set the appropriate error code in the
error field" (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_CMD_CACHE; SHOULD for
NBD_CMD_READ).  Which code fits each case is named, at SHOULD level, under
"Error values" and checked there (test_errors.py, test_readonly.py); what
every case must have is a code the spec defines: the field is no place for
a host's errno (ENOENT, EAGAIN) or for a value in the wrong byte order.

So these checks make each command fail in every way a client can provoke
from the wire, under simple and under structured replies (an error chunk
carries its own error field), on a writable export, a read-only one and
one with a minimum block size, and judge each error value.  Errors of the
storage itself (EIO, a full disk) cannot be provoked from the wire.  A case
the server accepts has no error to judge; a server that accepts them all
is reported as unsupported, not passed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from conformance.servers import ServerConfig
from conformance.spec import MUST, SHOULD, SpecViolation, expect, spec, unsupported
from conformance.wire import Cmd, Disconnected, Errno, ProtocolViolation, TransmissionFlag
from conformance.wire import session as s

REQUESTS = "Values / Transmission phase / Request types"
QUOTE_MUST = (
    "If an error occurs, the server MUST set the appropriate error code in the error field."
)
QUOTE_SHOULD = (
    "If an error occurs, the server SHOULD set the appropriate error code in the error field."
)

#: Bit 13: no command flag has it (Values / Transmission phase / Command flags).
UNKNOWN_FLAG = 1 << 13

COMMANDS = {
    "write": (Cmd.WRITE, None),
    "write-zeroes": (Cmd.WRITE_ZEROES, TransmissionFlag.SEND_WRITE_ZEROES),
    "cache": (Cmd.CACHE, TransmissionFlag.SEND_CACHE),
    "read": (Cmd.READ, None),
}


@dataclass(frozen=True)
class Case:
    """One way to make a request fail: where, how long, with which flags."""

    name: str
    offset: Callable[[int], int]  # of the export size
    length: int
    flags: int = 0


#: Cases every export can be asked; the offsets are functions of the export size.
CASES = (
    Case("straddling the end", lambda size: size - 4096, 8192),
    Case("past the end", lambda size: size + 4096, 4096),
    Case("ending one byte past the end", lambda size: size - 4095, 4096),
    Case("with an unknown flag (bit 13)", lambda size: 0, 4096, UNKNOWN_FLAG),
    Case("with a flag of another command (NBD_CMD_FLAG_REQ_ONE)", lambda size: 0, 4096, 1 << 3),
)
#: Unaligned to a 512-byte minimum block size.
UNALIGNED = (
    Case("unaligned offset", lambda size: 1, 512),
    Case("unaligned length", lambda size: 0, 511),
)
#: Any request on a read-only export, for the commands that write.
ON_READ_ONLY = (Case("on a read-only export", lambda size: 4096, 4096),)

EXPORTS = {
    # name: (configuration, the cases it is asked)
    "writable": (ServerConfig(), CASES),
    "read-only": (ServerConfig(read_only=True), ON_READ_ONLY),
    "min-block-512": (ServerConfig(minimum_block_size=512), UNALIGNED),
}


def _errors(server, command: str, cases) -> list[tuple[str, Errno]]:
    """[(what, error)] for each case and reply mode in which the request failed.

    Every case breaks a client MUST (the range, the alignment, the flags, a
    write where READ_ONLY forbids it), so the server MAY hard-disconnect
    instead of answering ("Terminating the transmission phase"): such a case
    has no error to judge, and the next one gets a new connection.  A reply
    that never comes, or one that breaks the framing, fails the check.
    """
    cmd, _ = COMMANDS[command]
    failed: list[tuple[str, Errno]] = []
    for replies in _reply_modes(server, command):
        for case in cases:
            client, export = s.transmission_with(server, replies)
            offset = case.offset(export.size)
            what = (
                f"{command} {case.name} (offset {offset}, length {case.length}; {replies} replies)"
            )
            payload = b"\x5a" * case.length if cmd == Cmd.WRITE else b""
            try:
                reply = client.request(cmd, offset, case.length, flags=case.flags, payload=payload)
            except Disconnected:
                continue  # a hard disconnect: allowed for a request that breaks a MUST
            except (TimeoutError, ProtocolViolation) as exc:
                raise SpecViolation(what, detail=f"expected a reply, actual {exc}") from None
            finally:
                client.close()
            if reply.error != Errno.OK:
                failed.append((what, reply.error))
    return failed


def _reply_modes(server, command: str) -> list[str]:
    """The reply modes the server negotiates (simple always; structured where offered);
    UNSUPPORTED when it does not advertise COMMAND."""
    _, needs = COMMANDS[command]
    modes = []
    for replies in ("simple", "structured"):
        try:
            client, export = s.transmission_with(server, replies)
        except pytest.skip.Exception:
            continue  # no structured replies: the simple mode stands alone
        client.disconnect()
        client.close()
        if needs is not None and not export.flags & needs:
            unsupported(f"the server does not advertise NBD_FLAG_{needs.name}")
        modes.append(replies)
    assert modes, "no reply mode could be negotiated"
    return modes


def _judge(failed: list[tuple[str, Errno]], command: str, export: str) -> None:
    if not failed:
        unsupported(
            f"no {command} on the {export} export got an error (each was accepted, or the "
            "server hung up, as it may)"
        )
    for what, error in failed:
        expect(
            not error.name.startswith("UNKNOWN"),
            f"error of {what}",
            "a value of 'Error values' (EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, "
            "ENOTSUP, ESHUTDOWN)",
            f"{int(error)} ({error.name})",
        )


@pytest.mark.writes
@pytest.mark.parametrize(
    ("command", "export"),
    # A read-only export refuses the commands that write; a CACHE it serves.
    [
        (command, export)
        for command in ("write", "write-zeroes", "cache")
        for export in EXPORTS
        if not (command == "cache" and export == "read-only")
    ],
)
@spec(REQUESTS, MUST, quote=QUOTE_MUST)
def test_failed_request_carries_a_defined_error(start_server, command, export):
    """Each way a WRITE, WRITE_ZEROES or CACHE can be refused from the wire, under simple
    and structured replies: every error value is one "Error values" defines."""
    config, cases = EXPORTS[export]
    server = start_server(config)
    _judge(_errors(server, command, cases), command, export)


@pytest.mark.parametrize("export", ["writable", "min-block-512"])
@spec(REQUESTS, SHOULD, quote=QUOTE_SHOULD)
def test_failed_read_carries_a_defined_error(start_server, export):
    """Each way a READ can be refused from the wire, under simple and structured replies:
    every error value is one "Error values" defines."""
    config, cases = EXPORTS[export]
    server = start_server(config)
    _judge(_errors(server, "read", cases), "read", export)
