"""Deterministic replays of crashes the fuzzing campaigns found in third-party servers.

test_fuzz.py's campaigns found these with other seeds; each check here replays
the minimal trigger a few times, because both are races between the server's
reply and the client's next move.
"""

from __future__ import annotations

import contextlib

import pytest

from conformance.spec import MUST, SpecViolation, spec
from conformance.wire import Cmd, Disconnected, Opt, ProtocolViolation
from conformance.wire import messages as m
from conformance.wire import session as s
from conformance.wire.constants import REQUEST_MAGIC

# Fuzzing may crash or wedge the server: against a server the suite did not
# start it runs only with --allow-disruptive.
pytestmark = pytest.mark.disruptive

REPEAT = 16
PIPELINED = 16  # failing requests in flight when the bad magic arrives


@spec(
    "Protocol phases / Handshake / Termination of the session during option haggling",
    MUST,
    "There is no requirement for the client or server to complete a negotiation if it does not "
    "wish to do so.",
)
def test_client_vanishing_right_after_export_name(server):
    """A client that sends NBD_OPT_EXPORT_NAME for the export and hangs up before reading the
    reply: the server's write fails, and that must cost it this connection only.  (qemu-nbd
    7.2 dies of SIGSEGV on the first such client.)"""
    name = s.export_name(server)
    for i in range(REPEAT):
        try:
            client = s.negotiated(server)
        except (OSError, Disconnected, ProtocolViolation) as exc:
            raise SpecViolation(
                f"client {i} after {i} clients vanished right after NBD_OPT_EXPORT_NAME",
                detail=f"expected to reach option haggling, actual {exc!r}",
            ) from None
        with contextlib.suppress(Disconnected, OSError):
            client.send_option(Opt.EXPORT_NAME, name)
        client.close()
    s.assert_still_serving(server, f"{REPEAT} clients vanished right after NBD_OPT_EXPORT_NAME")


@spec(
    "Protocol phases / Transmission / Terminating the transmission phase",
    MUST,
)
@pytest.mark.parametrize("replies", ["simple", "structured"])
def test_bad_magic_right_after_a_request_that_fails(server, replies):
    """READs beyond the end of the export (error replies are due) immediately followed by a
    request header with a bad magic: the server may drop this connection, and only it.
    (nbdkit 1.32 with structured replies aborts: "raw_send_socket: Assertion `sock >= 0'
    failed", the error reply racing the disconnect.)"""
    for i in range(REPEAT):
        try:
            client, export = s.transmission_with(server, replies)
        except (OSError, Disconnected) as exc:
            raise SpecViolation(
                f"client {i} after {i} requests with a bad magic",
                detail=f"expected to be served, actual {exc!r}",
            ) from None
        beyond = b"".join(
            m.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, k, export.size + (1 << 30), 4096)
            for k in range(1, PIPELINED + 1)
        )
        bad = m.REQUEST.pack(0xDEADBEEF, 0, Cmd.READ, 0, 0, 4096)
        with contextlib.suppress(Disconnected, OSError):
            client.send(beyond + bad)
            client.expect_disconnect(1.0)
        client.close()
    s.assert_still_serving(
        server, f"{REPEAT} READs beyond the end, each followed by a bad magic ({replies} replies)"
    )
