"""Every reply path echoes the request's 64-bit cookie in full.

libnbd numbers its cookies from 1, so a server that keeps only the low 32
bits of a cookie (or mangles its high half) passes every libnbd-driven
check.  These raw-wire checks send cookies with every bit pattern that
matters (high half set, low half zero, each byte distinct) on each reply
path: simple replies (success, error), structured chunks (data, hole,
error, block status, none) and extended replies.  The spec:

    In each reply message (whether simple, structured, or extended), the
    server MUST use the same value for cookie as was sent by the client in
    the corresponding request, treating the cookie as an opaque field.
"""

from __future__ import annotations

import contextlib

import pytest

from conformance.spec import MUST, SpecViolation, expect, expect_equal, spec
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

TRANSMISSION = "Protocol phases / Transmission"
SAME_COOKIE = (
    "In each reply message (whether simple, structured, or extended), the server MUST use the "
    "same value for cookie as was sent by the client in the corresponding request, treating "
    "the cookie as an opaque field."
)
#: Cookies a server keeping 32 bits, a signed value, or a byte-swapped one would get wrong.
COOKIES = (0xFEDCBA9876543210, 0x8000000100000000, 0x00000000FFFFFFFF + (0x7F << 56))
BLOCK = 4096
DATA = bytes(range(256)) * (BLOCK // 256)


@contextlib.contextmanager
def _transmission(server, mode: str):
    """A raw client in MODE (simple, structured, extended), base:allocation where offered."""
    with s.reply_mode(server, mode) as session:
        yield session.client, session.export, session.context_id is not None


def _answer(client, cookie: int, what: str) -> list[str]:
    """Read every message of the reply to COOKIE; fail on the first whose cookie differs."""
    kinds = []
    while True:
        try:
            msg = client.recv_message()
        except (Disconnected, TimeoutError, ProtocolViolation) as exc:
            raise SpecViolation(
                f"reply to {what}", detail=f"expected a reply with cookie {cookie:#x}, actual {exc}"
            ) from None
        kind = "simple reply" if isinstance(msg, m.SimpleReply) else f"{msg.type.name} chunk"
        if isinstance(msg, m.SimpleReply) and msg.error:
            kind = f"simple reply ({msg.error.name})"
        expect_equal(f"{msg.cookie:#018x}", f"{cookie:#018x}", f"cookie of the {kind} to {what}")
        kinds.append(kind)
        if isinstance(msg, m.SimpleReply) or msg.done:
            return kinds


def _paths(export, has_context: bool, writes: bool):
    """(what, command, offset, length, payload) for every reply path this export offers."""
    paths = [
        ("READ of data", Cmd.READ, BLOCK, BLOCK, b""),
        ("READ of a hole", Cmd.READ, 8 * BLOCK, BLOCK, b""),
        ("READ beyond the end", Cmd.READ, export.size + BLOCK, BLOCK, b""),
    ]
    if export.flags & TransmissionFlag.SEND_FLUSH:
        paths.append(("FLUSH", Cmd.FLUSH, 0, 0, b""))
    if has_context:
        paths.append(("BLOCK_STATUS", Cmd.BLOCK_STATUS, 0, 16 * BLOCK, b""))
    if writes:
        paths.insert(0, ("WRITE", Cmd.WRITE, BLOCK, BLOCK, DATA))
    return paths


@spec(TRANSMISSION, MUST, SAME_COOKIE)
@pytest.mark.writes
@pytest.mark.parametrize("mode", ["simple", "structured", "extended"])
def test_every_reply_path_echoes_the_whole_cookie(server, mode):
    """WRITE, READ (data, hole, beyond the end), FLUSH and BLOCK_STATUS, each with three
    cookies whose high halves matter: every message of every reply carries the cookie."""
    with _transmission(server, mode) as (client, export, has_context):
        seen: set[str] = set()
        for what, cmd, offset, length, payload in _paths(export, has_context, writes=True):
            for cookie in COOKIES:
                flags = CmdFlag.PAYLOAD_LEN if cmd == Cmd.WRITE and client.extended else 0
                client.send_request(
                    cmd, offset, length, flags=flags, cookie=cookie, payload=payload
                )
                seen.update(_answer(client, cookie, f"{what} (cookie {cookie:#x})"))
        if mode == "simple":
            expect(
                "simple reply" in seen and any(k.startswith("simple reply (") for k in seen),
                "reply paths exercised",
                "simple replies, with and without an error",
                sorted(seen),
            )
        else:
            expect(
                any(k.startswith("ERROR") for k in seen) and "OFFSET_DATA chunk" in seen,
                "reply paths exercised",
                "an OFFSET_DATA chunk and an error chunk at least",
                sorted(seen),
            )


@spec(
    "Protocol phases / Transmission",
    MUST,
    "S: 64 bits, cookie (MUST match the request)",
)
def test_extended_reply_cookie_matches_request(server):
    """Extended replies to READ (data, error), FLUSH and BLOCK_STATUS, several cookies."""
    with _transmission(server, "extended") as (client, export, has_context):
        for what, cmd, offset, length, payload in _paths(export, has_context, writes=False):
            for cookie in COOKIES:
                client.send_request(cmd, offset, length, cookie=cookie, payload=payload)
                _answer(client, cookie, f"{what} (cookie {cookie:#x}), extended headers")
        reply = client.read(0, 512)
        expect_equal(reply.error, Errno.OK, "READ after the cookie checks")
