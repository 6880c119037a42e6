"""The annotated wire log behind ``--trace``: one line per protocol message.

It is the teaching view of the protocol: each line names the direction
(``C>`` client to server, ``S>`` server to client), the message and its fields
with the spec's constant names, e.g.::

    [1] C> option NBD_OPT_GO length=12
    [1] S> option reply NBD_OPT_GO NBD_REP_INFO info=NBD_INFO_EXPORT size=1048576 ...
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Mapping
from typing import TextIO

from .protocol import constants, wire

_PREFIX = {
    constants.Option: "NBD_OPT_",
    constants.Reply: "NBD_REP_",
    constants.Info: "NBD_INFO_",
    constants.Command: "NBD_CMD_",
    constants.ChunkType: "NBD_REPLY_TYPE_",
    constants.Errno: "NBD_",
    constants.HandshakeFlag: "NBD_FLAG_",
    constants.ClientFlag: "NBD_FLAG_",
    constants.TransmissionFlag: "NBD_FLAG_",
    constants.CommandFlag: "NBD_CMD_FLAG_",
    constants.ReplyFlag: "NBD_REPLY_FLAG_",
    constants.StateFlag: "NBD_STATE_",
}


def describe(value: object) -> str:
    """Render a field value with the spec's names."""
    if isinstance(value, enum.IntFlag):
        prefix = _PREFIX.get(type(value), "")
        names = [prefix + (m.name or "") for m in type(value) if m in value]
        return "|".join(names) if names else "0"
    if isinstance(value, enum.IntEnum):
        name = value.name or str(int(value))
        if "(" in name:  # an unknown value from the wire
            return name
        return _PREFIX.get(type(value), "") + name
    if isinstance(value, bytes | bytearray):
        return repr(bytes(value))
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _decode_option_data(option: object, data: bytes) -> dict[str, object]:
    """Name the fields of an option's payload, where the layout is known."""
    try:
        if option in (constants.Option.INFO, constants.Option.GO):
            info = wire.unpack_info_request(data)
            return {"name": _text(info.name), "requests": _names(info.requests)}
        if option in (constants.Option.LIST_META_CONTEXT, constants.Option.SET_META_CONTEXT):
            meta = wire.unpack_meta_context_request(data, max_queries=1 << 16)
            return {"name": _text(meta.name), "queries": [_text(q) for q in meta.queries]}
        if option == constants.Option.EXPORT_NAME:
            return {"name": _text(data)}
    except (wire.MalformedPayload, OverflowError) as exc:
        return {"malformed": str(exc)}
    return {"data": data[:64]} if data else {}


def _text(raw: bytes, limit: int = 80) -> str:
    text = raw[:limit].decode("utf-8", "replace")
    return text + ("..." if len(raw) > limit else "")


def _names(values: tuple[constants.Info, ...]) -> str:
    return "[" + ",".join(describe(v) for v in values) + "]"


def format_message(direction: str, kind: str, fields: Mapping[str, object]) -> str:
    """One trace line (without connection prefix)."""
    parts = [f"{direction}>", kind]
    if kind == "option" and isinstance(fields.get("data"), bytes):
        fields = dict(fields)
        fields.update(_decode_option_data(fields["option"], fields.pop("data")))  # type: ignore[arg-type]
    for key, value in fields.items():
        if key in ("option", "reply", "command") and isinstance(value, enum.IntEnum):
            parts.append(describe(value))
        elif key == "requests":
            parts.append(f"{key}={value}")
        else:
            parts.append(f"{key}={describe(value)}")
    return " ".join(parts)


class TraceLog:
    """Writes trace lines for every connection to one text stream."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def for_connection(self, number: int) -> _ConnectionTracer:
        return _ConnectionTracer(self, number)

    def write(self, line: str) -> None:
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class _ConnectionTracer:
    def __init__(self, log: TraceLog, number: int) -> None:
        self._log = log
        self._prefix = f"[{number}] "

    def __call__(self, direction: str, kind: str, fields: Mapping[str, object]) -> None:
        self._log.write(self._prefix + format_message(direction, kind, fields))

    def note(self, text: str) -> None:
        self._log.write(self._prefix + "-- " + text)
