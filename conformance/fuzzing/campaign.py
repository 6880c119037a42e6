"""A fuzzing campaign: fuzzed connections one after another, the server probed now and then.

A campaign writes a known pattern at the start of the export through a
well-behaved client (libnbd), runs the cases of one stage (each a fresh
connection: send some chunks, then hang up one way or another), and proves
every ``PROBE_EVERY`` cases and at the end that a new well-behaved client is
served and the pattern reads back unchanged, so that a failure names a short
window of cases.

Fuzzed traffic never addresses the pattern: offsets are at or beyond
``SCRATCH`` (or wrap around 2^64), and no random payload contains a request
magic (:func:`random_bytes`), so even a server that loses the framing cannot
find a request aimed at the pattern in them.

Bounded: ``BUDGET`` seconds per campaign.  Deterministic: the seed is
``NBD_FUZZ_SEED`` (decimal or 0x-hex) or a fixed default, and it is printed.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from conformance.data import pattern
from conformance.handle import close_handle
from conformance.spec import SpecViolation, unsupported
from conformance.wire import messages as m
from conformance.wire import session as s
from conformance.wire.constants import EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC

SEED_ENV = "NBD_FUZZ_SEED"
DEFAULT_SEED = 0x4E424446  # "NBDF": the same cases every run unless told otherwise

BUDGET = 12.0  # seconds of fuzzing per check; cases not started by then are not run
PROBE_EVERY = 25
PATTERN_SIZE = 256 * 1024
SCRATCH = 1 << 20  # fuzzed requests address only [SCRATCH, end) (or wrap around 2^64)
PATTERN = pattern(0, PATTERN_SIZE, tag=0xF022)
SEND_TIMEOUT = 2.0
DRAIN_TOTAL = 0.4  # the longest a case listens to the server before it hangs up
DRAIN_IDLE = 0.05  # ... or once the server has been silent this long
MAX_DATA = 64 * 1024  # bytes a case sends at most: never enough to fill a socket buffer
_GREETING = m.GREETING.size

# Any of these in a payload could start a request if a server lost the framing.
_MAGICS = [struct.pack(">I", magic) for magic in (REQUEST_MAGIC, EXTENDED_REQUEST_MAGIC)]


def fuzz_seed() -> int:
    text = os.environ.get(SEED_ENV, "").strip()
    if not text:
        return DEFAULT_SEED
    try:
        return int(text, 0)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV}={text!r} is not an integer") from None


def random_bytes(rng: random.Random, n: int) -> bytes:
    """N random bytes that contain no request magic anywhere."""
    data = bytearray(rng.getrandbits(8) for _ in range(n))
    for magic in _MAGICS:
        at = data.find(magic)
        while at >= 0:
            data[at] ^= 0xFF
            at = data.find(magic, at)
    return bytes(data)


# --------------------------------------------------------------- one case


@dataclass
class Case:
    """What one fuzzed connection does: send these chunks, then end like this."""

    what: str
    chunks: list[bytes] = field(default_factory=list)
    # "close" (at once), "reset" (SO_LINGER 0), "drain" (listen, then close)
    ending: str = "drain"


def hang_up(sock: socket.socket, ending: str) -> str:
    """Hang up as the case says; what the server did meanwhile ("closed" or "open")."""
    outcome = "open"
    if ending == "drain":
        outcome = _drain(sock)
    elif ending == "reset":
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
    return outcome


def _drain(sock: socket.socket) -> str:
    """Read (and drop) what the server sends until it closes, goes quiet, or time is up."""
    deadline = time.monotonic() + DRAIN_TOTAL
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "open"
        try:
            sock.settimeout(min(left, DRAIN_IDLE))
            piece = sock.recv(1 << 20)
        except TimeoutError:
            return "open"
        except (OSError, ssl.SSLError):
            return "closed"
        if not piece:
            return "closed"


def send_all(sock: socket.socket, chunks: list[bytes]) -> bool:
    """Send every chunk; False once the server has closed (or stopped reading)."""
    sock.settimeout(SEND_TIMEOUT)
    for chunk in chunks:
        try:
            sock.sendall(chunk)
        except (OSError, ssl.SSLError):
            return False
    return True


# ---------------------------------------------------------- the campaign


class Campaign:
    """Runs the cases of one check, probing the server now and then."""

    def __init__(self, server, stage: str) -> None:
        self.server = server
        self.stage = stage
        self.seed = fuzz_seed()
        self.rng = random.Random(f"{self.seed}/{stage}")
        self.log: list[str] = []
        self.last_probe = 0
        self.started = time.monotonic()
        print(f"fuzz {stage}: seed {self.seed:#x} (set {SEED_ENV} to change it)")

    def write_pattern(self) -> int:
        """Write PATTERN at offset 0 through libnbd; return the export size."""
        h = self.server.connect()
        try:
            size = h.get_size()
            if size < 2 * SCRATCH:
                unsupported(f"the export ({size} bytes) is too small to fuzz beside the pattern")
            h.pwrite(PATTERN, 0)
            if h.can_flush():
                h.flush()
        finally:
            close_handle(h)
        return size

    def probe(self, after: str) -> None:
        """A well-behaved client is served and reads the pattern back unchanged."""
        try:
            s.assert_still_serving(self.server, after, expect=(0, PATTERN))
        except SpecViolation as exc:
            window = self.log[self.last_probe :]
            shown = "\n".join(f"  {line}" for line in window[-12:])
            raise SpecViolation(
                exc.what,
                detail=f"{str(exc).split(': ', 1)[-1]}\n"
                f"fuzz seed {self.seed:#x} ({SEED_ENV}); cases {self.last_probe}-"
                f"{len(self.log) - 1} since the last good probe, the last of them:\n{shown}",
            ) from None
        self.last_probe = len(self.log)

    def run(self, count: int, one_case: Callable[[random.Random], str]) -> None:
        for i in range(count):
            if time.monotonic() - self.started > BUDGET:
                break
            try:
                self.log.append(f"#{i} {one_case(self.rng)}")
            except Unreachable as exc:
                # Probe at once: if the server is gone, say so now with these cases.
                self.log.append(f"#{i} {exc}")
                self.probe(f"fuzz case #{i} could not reach the server ({self.stage})")
                continue
            if (i + 1) % PROBE_EVERY == 0:
                self.probe(f"fuzz cases up to #{i} ({self.stage})")
        elapsed = time.monotonic() - self.started
        print(f"fuzz {self.stage}: {len(self.log)} of {count} cases in {elapsed:.1f}s")
        self.probe(f"{len(self.log)} fuzzed connections ({self.stage})")


class Unreachable(Exception):
    """A case could not even start: a fresh connection failed."""


def open_connection(server, what: str) -> socket.socket:
    try:
        return server.open_socket(timeout=SEND_TIMEOUT)
    except OSError as exc:
        raise Unreachable(f"{what}: could not connect ({exc!r})") from None


def skip_greeting(sock: socket.socket) -> None:
    """Read (and drop) the 18-byte greeting, or as much as comes."""
    sock.settimeout(SEND_TIMEOUT)
    got = 0
    while got < _GREETING:
        piece = sock.recv(_GREETING - got)
        if not piece:
            return
        got += len(piece)
