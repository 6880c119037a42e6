"""Fuzzed requests: after a valid NBD_OPT_GO, requests a parser may not expect.

Random types, flags, lengths and offsets (never addressing the pattern: see
:mod:`conformance.fuzzing.campaign`), bad magics, huge lengths, stray bytes and
writes cut off in the middle of their payload, with simple, structured or
extended replies.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from conformance.fuzzing.campaign import (
    MAX_DATA,
    SCRATCH,
    SEND_TIMEOUT,
    Unreachable,
    hang_up,
    random_bytes,
    send_all,
)
from conformance.wire import Cmd, CmdFlag, Disconnected, ProtocolViolation
from conformance.wire import messages as m
from conformance.wire import session as s
from conformance.wire.constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
)

COMMANDS = [Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES]
COMMANDS += [Cmd.BLOCK_STATUS, Cmd.RESIZE, Cmd.DISC]
KNOWN_FLAGS = list(CmdFlag)
BAD_MAGICS = [0, 0xFFFFFFFF, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, EXTENDED_REPLY_MAGIC]


@dataclass
class Mode:
    """What the connection negotiated; the export's size."""

    size: int
    structured: bool
    extended: bool


def _offset(rng: random.Random, size: int) -> int:
    """An offset at or beyond SCRATCH, or one that only wrap-around would bring back."""
    kind = rng.randrange(6)
    if kind <= 1:
        offset = SCRATCH + rng.randrange(0, size - SCRATCH)
        return offset - offset % 512 if kind == 0 else offset
    if kind == 2:
        return size - rng.randrange(1, 8192)
    if kind == 3:
        return size + rng.choice([0, 1, 4096, rng.randrange(1 << 30)])
    if kind == 4:
        return rng.choice([1 << 63, (1 << 64) - 1, (1 << 64) - 512, (1 << 63) - 1])
    return (1 << 64) - rng.randrange(1, 1 << 32)


def _length(rng: random.Random, extended: bool) -> int:
    choices = [0, rng.randrange(1, 4097), 512, 4096, 65536, 1 << 20, 1 << 25, (1 << 25) + 1]
    choices += [0xFFFFFFFF, rng.getrandbits(32)]
    if extended:
        choices += [1 << 32, rng.getrandbits(64), (1 << 64) - 1]
    return rng.choice(choices)


def fuzz_request(rng: random.Random, mode: Mode) -> tuple[bytes, str, bool, int]:
    """(bytes, description, whether the stream is still framed as the client sees it, type)."""
    cmd = rng.choice([*COMMANDS, *COMMANDS, rng.randrange(0x10000)])
    flag_kind = rng.randrange(3)
    if flag_kind == 0:
        flags = 0
    elif flag_kind == 1:
        flags = sum(rng.sample(KNOWN_FLAGS, rng.randrange(1, 3)))
    else:
        flags = rng.getrandbits(16)
    offset = _offset(rng, mode.size)
    length = _length(rng, mode.extended)
    magic = EXTENDED_REQUEST_MAGIC if mode.extended else REQUEST_MAGIC
    framed = True
    if rng.random() < 0.1:
        other = REQUEST_MAGIC if mode.extended else EXTENDED_REQUEST_MAGIC
        magic = rng.choice([*BAD_MAGICS, other, magic ^ (1 << rng.randrange(32))])
        framed = False
    cookie = rng.getrandbits(64)
    header_struct = m.EXTENDED_REQUEST if mode.extended else m.REQUEST
    width = 64 if mode.extended else 32
    header = header_struct.pack(magic, flags, cmd, cookie, offset, length & ((1 << width) - 1))
    payload = b""
    what = f"{Cmd(cmd).name} flags={flags:#x} offset={offset:#x} length={length:#x}"
    if magic not in (REQUEST_MAGIC, EXTENDED_REQUEST_MAGIC):
        what += f" magic={magic:#x}"
    if cmd == Cmd.WRITE:
        if length <= MAX_DATA and rng.random() < 0.8:
            payload = random_bytes(rng, length)
        else:
            payload = random_bytes(rng, rng.randrange(0, min(length, 16384) + 1))
            what += f" then {len(payload)} payload bytes"
            framed = False
    elif rng.random() < 0.08:
        payload = random_bytes(rng, rng.randrange(1, 512))
        what += f" + {len(payload)} stray bytes"
        framed = False
    return header + payload, what, framed, cmd


def negotiates_extended_headers(server) -> bool:
    """Whether the server negotiates extended headers (one well-behaved try)."""
    try:
        client, _ = s.transmission(server, extended=True, timeout=SEND_TIMEOUT)
    except (OSError, Disconnected, ProtocolViolation):
        return False
    client.disconnect()
    return True


def run_requests_case(server, rng: random.Random, size: int, can_extend: bool) -> str:
    mode = Mode(size, structured=rng.random() < 0.6, extended=can_extend and rng.random() < 0.4)
    label = "extended" if mode.extended else "structured" if mode.structured else "simple"
    try:
        client, _ = s.transmission(
            server, structured=mode.structured and not mode.extended, extended=mode.extended
        )
    except (OSError, Disconnected, ProtocolViolation) as exc:
        raise Unreachable(f"{label}: could not enter transmission ({exc!r})") from None
    chunks, whats = [], []
    framed = True
    for _ in range(rng.randrange(1, 6)):
        data, what, framed, cmd = fuzz_request(rng, mode)
        chunks.append(data)
        whats.append(what)
        if not framed or cmd == Cmd.DISC:
            break
    ending = rng.choice(["close", "reset", "drain"]) if not framed else "drain"
    if framed and rng.random() < 0.5:
        magic = EXTENDED_REQUEST_MAGIC if mode.extended else REQUEST_MAGIC
        header = m.EXTENDED_REQUEST if mode.extended else m.REQUEST
        chunks.append(header.pack(magic, 0, Cmd.DISC, 0, 0, 0))
        whats.append("DISC")
    sent = send_all(client.sock, chunks)
    outcome = hang_up(client.sock, ending)
    return f"{label}: {'; '.join(whats)} ({ending}): " + (
        f"server {outcome}" if sent else "server closed while we sent"
    )
