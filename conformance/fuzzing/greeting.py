"""Fuzzed greetings: random bytes before and instead of the client flags.

"Protocol phases / Handshake / Termination of the session during option
haggling": a server may drop such a connection, and only it.
"""

from __future__ import annotations

import contextlib
import random
import struct

from conformance.fuzzing.campaign import (
    Case,
    hang_up,
    open_connection,
    random_bytes,
    send_all,
    skip_greeting,
)
from conformance.wire import ClientFlag
from conformance.wire.constants import IHAVEOPT


def greeting_case(rng: random.Random) -> Case:
    kind = rng.choice(
        ["hang-up", "garbage-first", "random-flags", "short-flags", "flags-then-garbage"]
    )
    case = Case(kind, ending=rng.choice(["close", "reset", "drain", "drain"]))
    if kind == "garbage-first":
        case.chunks.append(random_bytes(rng, rng.randrange(1, 300)))
    elif kind == "random-flags":
        flags = rng.getrandbits(32) | rng.choice([0, ClientFlag.C_FIXED_NEWSTYLE])
        case.what += f" {flags:#x}"
        case.chunks.append(struct.pack(">I", flags) + random_bytes(rng, rng.randrange(0, 64)))
    elif kind == "short-flags":
        case.chunks.append(random_bytes(rng, rng.randrange(1, 4)))
    elif kind == "flags-then-garbage":
        flags = rng.choice([1, 3])
        body = random_bytes(rng, rng.randrange(1, 400))
        if rng.random() < 0.5:  # an option header with a good magic, the rest random
            body = struct.pack(">Q", IHAVEOPT) + body
        case.chunks.append(struct.pack(">I", flags) + body)
    return case


def run_greeting_case(server, rng: random.Random) -> str:
    case = greeting_case(rng)
    read_greeting = case.what != "garbage-first" and rng.random() < 0.8
    sock = open_connection(server, case.what)
    if read_greeting:
        with contextlib.suppress(OSError):
            skip_greeting(sock)
    sent = send_all(sock, case.chunks)
    outcome = hang_up(sock, case.ending)
    return f"{case.what} ({sum(map(len, case.chunks))} bytes, {case.ending}): " + (
        f"server {outcome}" if sent else "server closed while we sent"
    )
