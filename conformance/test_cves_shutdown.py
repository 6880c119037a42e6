"""Regression checks for CVE-2024-7409: stalled negotiations and shutting down with clients.

qemu-nbd could be locked out by clients that never finish negotiating, and
crashed (use after free) when shut down with clients still connected.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from conformance.server_process import alive, server_process
from conformance.servers.base import ServerConfig
from conformance.spec import SHOULD, expect, expect_equal, spec
from conformance.wire import Disconnected, Errno, Opt
from conformance.wire import messages as m
from conformance.wire import session as s

# Reproducers of crashes and hangs: against a server the suite did not start
# they run only with --allow-disruptive.
pytestmark = pytest.mark.disruptive

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


@spec("Protocol phases / Transmission / Terminating the transmission phase", SHOULD)
def test_cve_2024_7409_shutdown_with_clients_connected(open_server):
    """qemu crashed (use after free) when shut down with clients still negotiating.  SIGTERM
    with clients in negotiation and in transmission: the server exits promptly, without a
    crash, and every client sees the connection end."""
    pid, exit_status = server_process(open_server)
    clients = _stall(open_server, 4)
    active, _ = s.transmission(open_server)
    clients.append(active)
    try:
        expect_equal(active.read(0, 4096).error, Errno.OK, "READ before the shutdown")
        open_server.expect_exit()
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        expect(not alive(pid), "server process after SIGTERM", "exited within 10s", "running")
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
