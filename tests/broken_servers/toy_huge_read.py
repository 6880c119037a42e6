"""A toy NBD server that answers a READ above 4 GiB one of three ways, for one check.

For tests/test_huge_read_check_can_fail.py: conformance/test_read.py's check of a
READ of 2^32 - 1 bytes must pass against ``split`` (a 1 MiB data chunk, then
one hole chunk for the rest: nothing overflows, and nothing needs 4 GiB on the
wire) and ``refuse`` (NBD_EOVERFLOW up front: the check is unsupported), and
fail against ``overflow``: one NBD_REPLY_TYPE_OFFSET_DATA chunk whose 32-bit
length wrapped around (2^32 - 1 + 8 is 7 modulo 2^32), the bug the MUST is
about.  Fixed newstyle, NBD_OPT_STRUCTURED_REPLY and NBD_OPT_GO only; written
from the spec for this test alone.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from pathlib import Path

from conformance.wire import Cmd, Errno, HandshakeFlag, Info, Opt, Rep, ReplyFlag, ReplyType
from conformance.wire.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
)
from tests.broken_servers.toy_listener import ToyListener

SIZE = (1 << 32) + (1 << 20)
MODES = ("split", "refuse", "overflow")


class ToyHugeRead(ToyListener):
    """Listens on a Unix socket in DIRECTORY; one thread per connection; close() stops all."""

    tls = False
    tls_dir = None
    export_name = ""

    def __init__(self, directory: Path, mode: str) -> None:
        assert mode in MODES
        self.mode = mode
        super().__init__(str(directory / f"toy-huge-{mode}.sock"))

    def serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with conn, contextlib.suppress(OSError, EOFError, struct.error):
            self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        def recv(n: int) -> bytes:
            data = b""
            while len(data) < n:
                piece = conn.recv(n - len(data))
                if not piece:
                    raise EOFError
                data += piece
            return data

        def reply(option: int, rep: int, data: bytes = b"") -> None:
            conn.sendall(struct.pack(">QIII", OPTION_REPLY_MAGIC, option, rep, len(data)) + data)

        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE))
        recv(4)
        while True:
            _, option, length = struct.unpack(">QII", recv(16))
            recv(length)
            if option == Opt.GO:
                reply(option, Rep.INFO, struct.pack(">HQH", Info.EXPORT, SIZE, 1))
                reply(option, Rep.ACK)
                break
            reply(option, Rep.ACK if option == Opt.STRUCTURED_REPLY else Rep.ERR_UNSUP)
        while True:
            _, _, cmd, cookie, offset, length = struct.unpack(">IHHQQI", recv(28))
            if cmd == Cmd.DISC:
                return
            conn.sendall(b"".join(self._read_reply(cookie, offset, length)))

    def _read_reply(self, cookie: int, offset: int, length: int) -> list[bytes]:
        def chunk(kind: int, payload: bytes, done: bool, claimed: int | None = None) -> bytes:
            flags = ReplyFlag.DONE if done else 0
            size = len(payload) if claimed is None else claimed
            return (
                struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, kind, cookie, size) + payload
            )

        if self.mode == "refuse":
            message = b"too large"
            body = struct.pack(">IH", Errno.EOVERFLOW, len(message)) + message
            return [chunk(ReplyType.ERROR, body, True)]
        first = min(length, 1 << 20)
        data = chunk(ReplyType.OFFSET_DATA, struct.pack(">Q", offset) + bytes(first), False)
        if self.mode == "overflow":
            # The whole read claimed in one chunk: the length field wraps to (length + 8) % 2^32.
            wrapped = (length + 8) & 0xFFFFFFFF
            header = chunk(ReplyType.OFFSET_DATA, b"", True, claimed=wrapped)
            return [header, struct.pack(">Q", offset), bytes(first)]
        hole = struct.pack(">QI", offset + first, length - first)
        return [data, chunk(ReplyType.OFFSET_HOLE, hole, True)]
