"""Fuzzed option haggling: structure-aware mutations of a valid negotiation.

A valid haggling is built field by field (:class:`Field` knows whether it is a
magic, an option number, a length, ...), so that mutations hit what a parser
trusts: flipped bits in magics, option numbers and lengths, truncated and
extended payloads, absurd lengths, duplicated and cut-off options, names over
the 4096-byte limit.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from conformance.fuzzing.campaign import (
    MAX_DATA,
    SEND_TIMEOUT,
    Unreachable,
    hang_up,
    open_connection,
    random_bytes,
    send_all,
    skip_greeting,
)
from conformance.wire import Disconnected, Info, Opt, ProtocolViolation
from conformance.wire import session as s
from conformance.wire.constants import IHAVEOPT


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
            sock = open_connection(server, what)
            skip_greeting(sock)
    except (OSError, Disconnected, ProtocolViolation) as exc:
        raise Unreachable(f"{what}: no greeting ({exc!r})") from None
    sent = send_all(sock, [stream])
    outcome = hang_up(sock, ending)
    return f"{what} ({len(stream)} bytes, {ending}): " + (
        f"server {outcome}" if sent else "server closed while we sent"
    )
