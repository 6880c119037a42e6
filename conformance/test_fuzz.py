"""Network-level fuzzing: malformed and random traffic, then the server still serves, data intact.

Each check first writes a known pattern at the start of the export through a
well-behaved client (libnbd), then opens many fresh connections and sends
malformed traffic at one stage of the protocol, and finally proves that a new
well-behaved client is served and the pattern reads back unchanged (also every
``PROBE_EVERY`` cases, so that a failure names a short window of cases).

* greeting: random bytes before and instead of the client flags;
* options: structure-aware mutations of a valid option haggling (flipped bits
  in magics, option numbers and lengths, truncated and extended payloads,
  absurd lengths, duplicated and cut-off options);
* requests: after a valid NBD_OPT_GO, requests with random types, flags,
  lengths and offsets, bad magics, huge lengths, abrupt disconnects in the
  middle of a write payload.

Fuzzed requests never address the pattern: every offset they carry is at or
beyond ``SCRATCH`` (some near 2^63 or 2^64, where only a server that lets
offset + length wrap around could reach the pattern), and no payload contains a
request magic, so even a server that loses the framing cannot find a request
aimed at the pattern in them.

Bounded: ``CASES`` per check and ``BUDGET`` seconds (whichever comes first).
Deterministic: the seed is ``NBD_FUZZ_SEED`` (decimal or 0x-hex) or a fixed
default, and it is printed; rerun a failure with the seed its message shows.
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
from conformance.spec import MUST, SpecViolation, spec, unsupported
from conformance.wire import ClientFlag, Cmd, CmdFlag, Disconnected, Info, Opt, ProtocolViolation
from conformance.wire import messages as m
from conformance.wire import session as s
from conformance.wire.constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
)

# Fuzzing may crash or wedge the server: against a server the suite did not
# start it runs only with --allow-disruptive.
pytestmark = pytest.mark.disruptive

SEED_ENV = "NBD_FUZZ_SEED"
DEFAULT_SEED = 0x4E424446  # "NBDF": the same cases every run unless told otherwise
CASES = {"greeting": 60, "options": 120, "requests": 120}
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


def _end(sock: socket.socket, ending: str) -> str:
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


def _send(sock: socket.socket, chunks: list[bytes]) -> bool:
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


def _open(server, what: str) -> socket.socket:
    try:
        return server.open_socket(timeout=SEND_TIMEOUT)
    except OSError as exc:
        raise Unreachable(f"{what}: could not connect ({exc!r})") from None


def _read_greeting(sock: socket.socket) -> None:
    """Read (and drop) the 18-byte greeting, or as much as comes."""
    sock.settimeout(SEND_TIMEOUT)
    got = 0
    while got < _GREETING:
        piece = sock.recv(_GREETING - got)
        if not piece:
            return
        got += len(piece)


# ------------------------------------------------------- greeting stage


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
    sock = _open(server, case.what)
    if read_greeting:
        with contextlib.suppress(OSError):
            _read_greeting(sock)
    sent = _send(sock, case.chunks)
    outcome = _end(sock, case.ending)
    return f"{case.what} ({sum(map(len, case.chunks))} bytes, {case.ending}): " + (
        f"server {outcome}" if sent else "server closed while we sent"
    )


# -------------------------------------------------------- options stage


@dataclass
class Field:
    """One field of the byte stream, with its kind so mutations know what it is."""

    kind: str  # magic, option, length, count, info, flags, data
    data: bytes


@dataclass
class Option:
    fields: list[Field]

    @property
    def payload(self) -> list[Field]:
        return self.fields[3:]


def _u32(value: int) -> bytes:
    return struct.pack(">I", value & 0xFFFFFFFF)


def _option(number: int, payload: list[Field]) -> Option:
    length = sum(len(f.data) for f in payload)
    return Option(
        [
            Field("magic", struct.pack(">Q", IHAVEOPT)),
            Field("option", _u32(number)),
            Field("length", _u32(length)),
            *payload,
        ]
    )


def _name_and_infos(name: bytes, infos: list[int]) -> list[Field]:
    return [
        Field("length", _u32(len(name))),
        Field("data", name),
        Field("count", struct.pack(">H", len(infos))),
        *(Field("info", struct.pack(">H", i)) for i in infos),
    ]


def _meta_query(name: bytes, queries: list[bytes]) -> list[Field]:
    fields = [Field("length", _u32(len(name))), Field("data", name)]
    fields.append(Field("count", _u32(len(queries))))
    for query in queries:
        fields += [Field("length", _u32(len(query))), Field("data", query)]
    return fields


def valid_haggling(rng: random.Random, name: bytes) -> list[Option]:
    """A few valid options, ending with NBD_OPT_GO (or NBD_OPT_EXPORT_NAME)."""
    infos = [Info.BLOCK_SIZE, Info.NAME, Info.DESCRIPTION, Info.EXPORT]
    extras = [
        lambda: _option(Opt.STRUCTURED_REPLY, []),
        lambda: _option(Opt.LIST, []),
        lambda: _option(Opt.INFO, _name_and_infos(name, rng.sample(infos, rng.randrange(4)))),
        lambda: _option(Opt.SET_META_CONTEXT, _meta_query(name, [b"base:allocation"])),
        lambda: _option(Opt.LIST_META_CONTEXT, _meta_query(name, [b"base:"])),
        lambda: _option(Opt.EXTENDED_HEADERS, []),
    ]
    options = [rng.choice(extras)() for _ in range(rng.randrange(0, 4))]
    if rng.random() < 0.85:
        options.append(_option(Opt.GO, _name_and_infos(name, [Info.BLOCK_SIZE])))
    else:
        options.append(_option(Opt.EXPORT_NAME, [Field("data", name)]))
    return options


ABSURD = [0, 1, 0xFFFFFFFF, 0xFFFFFFFE, 0x80000000, 0x7FFFFFFF, 0xFFFFFFF0, 4097, 65536, 1 << 25]
OPTION_NUMBERS = [0, *range(1, 13), 0x2A, 0x80000000, 0xFFFFFFFF]


def _flip(data: bytes, rng: random.Random) -> bytes:
    bit = rng.randrange(len(data) * 8)
    out = bytearray(data)
    out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


def mutate(rng: random.Random, flags: Field | None, options: list[Option]) -> tuple[bytes, str]:
    """Apply 1-3 structure-aware mutations; return the stream and what was done."""
    done = []
    for _ in range(rng.randrange(1, 4)):
        option = rng.choice(options)
        numeric = [
            f
            for f in [*option.fields, *([flags] if flags is not None else [])]
            if f.kind in ("magic", "option", "length", "count", "info", "flags") and f.data
        ]
        kind = rng.choice(
            ["flip", "flip", "absurd", "truncate", "extend", "number", "duplicate", "long-name"]
        )
        if kind == "flip" and numeric:
            target = rng.choice(numeric)
            target.data = _flip(target.data, rng)
            done.append(f"flip {target.kind}")
        elif kind == "absurd":
            lengths = [f for f in option.fields if f.kind in ("length", "count") and f.data]
            if not lengths:
                continue
            target = rng.choice(lengths)
            value = rng.choice(ABSURD)
            width = len(target.data)
            target.data = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big")
            done.append(f"{target.kind}={value:#x}")
        elif kind == "truncate" and option.payload:
            target = rng.choice(option.payload)
            cut = rng.randrange(0, len(target.data) + 1)
            target.data = target.data[:cut]
            done.append(f"truncate {target.kind} to {cut}")
        elif kind == "extend":
            extra = random_bytes(rng, rng.randrange(1, 64))
            option.fields.append(Field("data", extra))
            if rng.random() < 0.5:
                length = sum(len(f.data) for f in option.payload)
                option.fields[2].data = _u32(length)
                done.append(f"extend by {len(extra)} (length updated)")
            else:
                done.append(f"extend by {len(extra)} (length kept)")
        elif kind == "number":
            number = rng.choice([*OPTION_NUMBERS, rng.getrandbits(32)])
            option.fields[1].data = _u32(number)
            done.append(f"option={number:#x}")
        elif kind == "duplicate":
            at = options.index(option)
            options.insert(at, Option([Field(f.kind, f.data) for f in option.fields]))
            done.append("duplicate")
        elif kind == "long-name":
            names = [f for f in option.fields if f.kind == "data"]
            if names:
                target = rng.choice(names)
                target.data = b"n" * rng.choice([4096, 4097, 20000])
                if rng.random() < 0.5:
                    option.fields[2].data = _u32(sum(len(f.data) for f in option.payload))
                done.append(f"name of {len(target.data)} bytes")
    stream = (flags.data if flags is not None else b"") + b"".join(
        f.data for o in options for f in o.fields
    )
    if stream and rng.random() < 0.25:
        cut = rng.randrange(0, len(stream))
        stream = stream[:cut]
        done.append(f"cut at byte {cut}")
    return stream[:MAX_DATA], ", ".join(done) or "none"


def run_options_case(server, rng: random.Random) -> str:
    name = s.export_name(server)
    tls = s.tls_context(server) is not None
    flags = None if tls else Field("flags", _u32(rng.choice([1, 3])))
    stream, what = mutate(rng, flags, valid_haggling(rng, name))
    ending = rng.choice(["close", "reset", "drain", "drain", "drain"])
    try:
        if tls:
            client = s.negotiated(server, timeout=SEND_TIMEOUT)
            sock = client.sock
        else:
            sock = _open(server, what)
            _read_greeting(sock)
    except (OSError, Disconnected, ProtocolViolation) as exc:
        raise Unreachable(f"{what}: no greeting ({exc!r})") from None
    sent = _send(sock, [stream])
    outcome = _end(sock, ending)
    return f"{what} ({len(stream)} bytes, {ending}): " + (
        f"server {outcome}" if sent else "server closed while we sent"
    )


# ------------------------------------------------------- requests stage

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


def _transmission_mode(server) -> bool:
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
    sent = _send(client.sock, chunks)
    outcome = _end(client.sock, ending)
    return f"{label}: {'; '.join(whats)} ({ending}): " + (
        f"server {outcome}" if sent else "server closed while we sent"
    )


# ---------------------------------------------------------------- checks


@spec(
    "Protocol phases / Handshake / Termination of the session during option haggling",
    MUST,
)
@pytest.mark.writes
def test_fuzzed_greetings_leave_the_server_serving_and_the_data_intact(server):
    """Random bytes in place of, around and after the client flags, on fresh connections: each
    connection may be dropped, but the server goes on serving others and loses no data."""
    campaign = Campaign(server, "greeting")
    campaign.write_pattern()
    campaign.run(CASES["greeting"], lambda rng: run_greeting_case(server, rng))


@spec(
    "Protocol phases / Handshake / Termination of the session during option haggling",
    MUST,
)
@pytest.mark.writes
def test_fuzzed_option_haggling_leaves_the_server_serving_and_the_data_intact(server):
    """Valid option haggling with flipped bits in magics, option numbers and lengths, truncated
    and extended payloads, absurd lengths, duplicated options and cut-off streams: the server
    errors or drops that connection only."""
    campaign = Campaign(server, "options")
    campaign.write_pattern()
    campaign.run(CASES["options"], lambda rng: run_options_case(server, rng))


@spec(
    "Protocol phases / Transmission / Terminating the transmission phase",
    MUST,
)
@pytest.mark.writes
def test_fuzzed_requests_leave_the_server_serving_and_the_data_intact(server):
    """After a valid NBD_OPT_GO: requests with random types, flags, offsets and lengths, bad
    magics, huge lengths and writes cut off mid-payload.  None of them addresses the pattern
    (a server that lets offset + length wrap around 2^64 would); the pattern stays intact and
    the server keeps serving."""
    campaign = Campaign(server, "requests")
    size = campaign.write_pattern()
    can_extend = _transmission_mode(server)
    campaign.run(CASES["requests"], lambda rng: run_requests_case(server, rng, size, can_extend))


# ------------------------------------------------ what the fuzzing found
#
# Deterministic regression checks for crashes the campaigns above found in
# third-party servers (with other seeds): each replays the minimal trigger a
# few times, because both are races between the server's reply and the
# client's next move.

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
            client, export = s.transmission(server, structured=replies == "structured")
        except ProtocolViolation as exc:
            if replies == "structured" and "STRUCTURED_REPLY" in str(exc):
                unsupported("the server does not negotiate NBD_OPT_STRUCTURED_REPLY")
            raise
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
