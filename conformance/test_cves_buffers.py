"""Regression checks for requests longer than a server's buffer, each named after its CVE.

nbd-server copied requests of any length into a fixed buffer (CVE-2005-3534)
and regressed for writes just over it (CVE-2011-0530).  Each check sends the
request over the raw wire, judges the answer, then proves that other data and
other clients are unaffected (conformance.wire.session.assert_still_serving).
"""

from __future__ import annotations

import pytest

from conformance.spec import MUST, expect, expect_equal, spec
from conformance.wire import Cmd, Disconnected, Errno
from conformance.wire import outcomes as o
from conformance.wire import session as s

# Reproducers of crashes and hangs: against a server the suite did not start
# they run only with --allow-disruptive.
pytestmark = pytest.mark.disruptive

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
    return o.within(client, lambda: client.reply(cookie))


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
            f"nothing within {o.WAIT}s",
        )
    except Disconnected:
        pass
    finally:
        client.close()
    s.assert_still_serving(server, f"a WRITE of {length} bytes", expect=(offset, MARKER))
