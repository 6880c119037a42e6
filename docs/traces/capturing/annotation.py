"""Annotated hex dumps: messages cut into the fields the specification lays out.

The layouts and names here are written from proto.md ("Protocol phases /
Handshake / Newstyle negotiation", "Fixed newstyle negotiation",
"Transmission" and "Values"); they do not come from the server's code.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from capturing import CaptureError

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

HANDSHAKE_FLAGS = {1: "NBD_FLAG_FIXED_NEWSTYLE", 2: "NBD_FLAG_NO_ZEROES"}
CLIENT_FLAGS = {1: "NBD_FLAG_C_FIXED_NEWSTYLE", 2: "NBD_FLAG_C_NO_ZEROES"}
TRANSMISSION_FLAGS = {
    1 << i: "NBD_FLAG_" + n
    for i, n in enumerate(
        [
            "HAS_FLAGS",
            "READ_ONLY",
            "SEND_FLUSH",
            "SEND_FUA",
            "ROTATIONAL",
            "SEND_TRIM",
            "SEND_WRITE_ZEROES",
            "SEND_DF",
            "CAN_MULTI_CONN",
            "SEND_RESIZE",
            "SEND_CACHE",
            "SEND_FAST_ZERO",
            "BLOCK_STATUS_PAYLOAD",
        ]
    )
}
OPTIONS = {7: "NBD_OPT_GO", 8: "NBD_OPT_STRUCTURED_REPLY"}
REPLIES = {1: "NBD_REP_ACK", 3: "NBD_REP_INFO"}
INFOS = {
    0: "NBD_INFO_EXPORT",
    1: "NBD_INFO_NAME",
    2: "NBD_INFO_DESCRIPTION",
    3: "NBD_INFO_BLOCK_SIZE",
}
COMMANDS = {0: "NBD_CMD_READ", 1: "NBD_CMD_WRITE", 2: "NBD_CMD_DISC"}
CHUNK_TYPES = {1: "NBD_REPLY_TYPE_OFFSET_DATA", 2: "NBD_REPLY_TYPE_OFFSET_HOLE"}
REPLY_FLAGS = {1: "NBD_REPLY_FLAG_DONE"}


def flags_of(names: dict[int, str]) -> Callable[[object], str]:
    """Show a bit field with the names of its bits."""

    def show(value: object) -> str:
        assert isinstance(value, int)
        parts = [name for bit, name in names.items() if value & bit]
        unknown = value & ~sum(names)
        if unknown:
            parts.append(hex(unknown))
        return "|".join(parts) or "0"

    return show


def enum_of(names: dict[int, str]) -> Callable[[object], str]:
    """Show a number with its name."""

    def show(value: object) -> str:
        assert isinstance(value, int)
        return f"{names.get(value, '?')} ({value})"

    return show


# A field: (name, struct format or byte count, how to show the value).
Field = tuple[str, str | int, Callable[[object], str]]


def show_hex(value: object) -> str:
    return f"{value:#x}" if isinstance(value, int) else repr(value)


def show_magic(value: object) -> str:
    assert isinstance(value, int)
    raw = value.to_bytes(8, "big").lstrip(b"\0")
    text = raw.decode("ascii", "replace")
    return f"{value:#x}" + (f' "{text}"' if text.isprintable() and len(raw) == 8 else "")


def show_dec(value: object) -> str:
    return str(value)


def show_text(value: object) -> str:
    return repr(bytes(value).decode()) if isinstance(value, bytes) else repr(value)


class Dump:
    """Accumulates annotated messages, one block per message."""

    def __init__(self) -> None:
        self.blocks: list[str] = []

    def message(self, direction: str, title: str, data: bytes, fields: list[Field]) -> None:
        lines = [f"{direction}> {title} ({len(data)} bytes)"]
        at = 0
        for name, layout, show in fields:
            if isinstance(layout, int):
                size = layout
                value: object = data[at : at + size]
            else:
                size = struct.calcsize(layout)
                (value,) = struct.unpack_from(layout, data, at)
            raw = data[at : at + size]
            shown = raw[:8].hex(" ") + (" .." if size > 8 else "")
            lines.append(f"  {at:04x}  {shown:<26} {name}: {show(value)}")
            at += size
        if at != len(data):
            raise CaptureError(f"{title}: {len(data) - at} bytes not accounted for")
        self.blocks.append("\n".join(lines))

    def text(self) -> str:
        return "\n\n".join(self.blocks) + "\n"
