"""A raw socket session with the server, shown byte by byte: ``raw-*.hex`` and ``raw.trace``.

Greeting, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_GO, a write, a read and
NBD_CMD_DISC, each message annotated field by field (:mod:`capturing.annotation`).
"""

from __future__ import annotations

import socket
import struct
import subprocess
from pathlib import Path

from capturing import CaptureError
from capturing.annotation import (
    CHUNK_TYPES,
    CLIENT_FLAGS,
    COMMANDS,
    HANDSHAKE_FLAGS,
    IHAVEOPT,
    INFOS,
    OPTIONS,
    REPLIES,
    REPLY_FLAGS,
    REQUEST_MAGIC,
    TRANSMISSION_FLAGS,
    Dump,
    Field,
    enum_of,
    flags_of,
    show_dec,
    show_hex,
    show_magic,
    show_text,
)
from capturing.scenario_runs import CLIENT_TIMEOUT, EXIT_TIMEOUT, normalise, start_server
from capturing.scenarios import served


class RawClient:
    """Just enough of a client to show real bytes: reads exactly, with a timeout."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(CLIENT_TIMEOUT)
        self.sock.connect(str(path))

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise CaptureError(f"the server closed the connection ({len(data)}/{n} bytes)")
            data += chunk
        return data

    def send(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        return data

    def close(self) -> None:
        self.sock.close()


def _option_reply(client: RawClient, dump: Dump) -> int:
    header = client.recv(20)
    _, _, reply, length = struct.unpack(">QIII", header)
    payload = client.recv(length)
    fields: list[Field] = [
        ("magic", ">Q", show_hex),
        ("option", ">I", enum_of(OPTIONS)),
        ("reply type", ">I", enum_of(REPLIES)),
        ("length", ">I", show_dec),
    ]
    title = f"option reply {REPLIES.get(reply, reply)}"
    if reply == 3:
        (info,) = struct.unpack_from(">H", payload)
        title += f" {INFOS.get(info, info)}"
        fields.append(("information type", ">H", enum_of(INFOS)))
        if info == 0:
            fields += [
                ("export size", ">Q", show_dec),
                ("transmission flags", ">H", flags_of(TRANSMISSION_FLAGS)),
            ]
        elif info in (1, 2):
            fields.append(("text", length - 2, show_text))
        elif info == 3:
            fields += [
                ("minimum block size", ">I", show_dec),
                ("preferred block size", ">I", show_dec),
                ("maximum block size", ">I", show_dec),
            ]
    elif length:
        fields.append(("data", length, show_hex))
    dump.message("S", title, header + payload, fields)
    return int(reply)


def raw_session(workdir: Path) -> dict[str, str]:
    """Greeting, NBD_OPT_GO, a write and a read, byte by byte."""
    server = start_server(served(export_name="disk"), workdir)
    handshake, transmission = Dump(), Dump()
    try:
        client = RawClient(server.socket_path)
        try:
            handshake.message(
                "S",
                "greeting",
                client.recv(18),
                [
                    ("magic", ">Q", show_magic),
                    ("option magic", ">Q", show_magic),
                    ("handshake flags", ">H", flags_of(HANDSHAKE_FLAGS)),
                ],
            )
            handshake.message(
                "C",
                "client flags",
                client.send(struct.pack(">I", 3)),
                [("client flags", ">I", flags_of(CLIENT_FLAGS))],
            )
            option_header: list[Field] = [
                ("magic", ">Q", show_magic),
                ("option", ">I", enum_of(OPTIONS)),
                ("length", ">I", show_dec),
            ]
            handshake.message(
                "C",
                "option NBD_OPT_STRUCTURED_REPLY",
                client.send(struct.pack(">QII", IHAVEOPT, 8, 0)),
                option_header,
            )
            _option_reply(client, handshake)
            name = b"disk"
            data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, 3)
            handshake.message(
                "C",
                "option NBD_OPT_GO",
                client.send(struct.pack(">QII", IHAVEOPT, 7, len(data)) + data),
                [
                    *option_header,
                    ("export name length", ">I", show_dec),
                    ("export name", len(name), show_text),
                    ("number of information requests", ">H", show_dec),
                    ("information request", ">H", enum_of(INFOS)),
                ],
            )
            for _ in range(8):
                if _option_reply(client, handshake) != 3:
                    break
            _transmission(client, transmission)
        finally:
            client.close()
        server.process.wait_exit(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CaptureError("raw session: the server did not exit after its client") from None
    finally:
        server.process.stop()
    return {
        "raw-handshake.hex": handshake.text(),
        "raw-transmission.hex": transmission.text(),
        "raw.trace": normalise(server.trace_path.read_text(), workdir),
    }


def _transmission(client: RawClient, dump: Dump) -> None:
    request: list[Field] = [
        ("magic", ">I", show_hex),
        ("command flags", ">H", show_hex),
        ("type", ">H", enum_of(COMMANDS)),
        ("cookie", ">Q", show_dec),
        ("offset", ">Q", show_dec),
        ("length", ">I", show_dec),
    ]
    payload = b"hello, NBD!\n"
    dump.message(
        "C",
        "request NBD_CMD_WRITE",
        client.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 1, 1, 0, len(payload)) + payload),
        [*request, ("data", len(payload), show_text)],
    )
    dump.message(
        "S",
        "simple reply",
        client.recv(16),
        [("magic", ">I", show_hex), ("error", ">I", show_dec), ("cookie", ">Q", show_dec)],
    )
    dump.message(
        "C",
        "request NBD_CMD_READ",
        client.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 2, 0, len(payload))),
        request,
    )
    done = False
    while not done:
        header = client.recv(20)
        _, flags, kind, _, length = struct.unpack(">IHHQI", header)
        body = client.recv(length)
        fields: list[Field] = [
            ("magic", ">I", show_hex),
            ("flags", ">H", flags_of(REPLY_FLAGS)),
            ("type", ">H", enum_of(CHUNK_TYPES)),
            ("cookie", ">Q", show_dec),
            ("length", ">I", show_dec),
            ("offset", ">Q", show_dec),
        ]
        if kind == 1:
            fields.append(("data", length - 8, show_text))
        elif kind == 2:
            fields.append(("hole size", ">I", show_dec))
        dump.message(
            "S", f"structured reply chunk {CHUNK_TYPES.get(kind, kind)}", header + body, fields
        )
        done = bool(flags & 1)
    dump.message(
        "C",
        "request NBD_CMD_DISC",
        client.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 2, 3, 0, 0)),
        request,
    )
