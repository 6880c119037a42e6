"""What every toy session reads and writes: exact reads over a greedy buffer, option replies,
and the metadata-context query the toys parse.

The toys (toy_nbd.py, toy_tls.py, toy_selective.py, toy_wide.py) each speak a
different part of the protocol, with different bugs; this is what they share.
"""

from __future__ import annotations

import socket
import struct

from conformance.wire.constants import OPTION_REPLY_MAGIC


class ToyConnection:
    """A toy's side of one connection.  ``sock`` may be replaced (by a TLS socket)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def fill(self) -> None:
        """Read what the peer has sent (greedy, like a buffered reader); EOFError at its end."""
        piece = self.sock.recv(1 << 20)
        if not piece:
            raise EOFError
        self.buffer += piece

    def recv(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def reply(self, option: int, rep: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QIII", OPTION_REPLY_MAGIC, option, rep, len(data)) + data)


def meta_context_query(data: bytes) -> tuple[bytes, list[bytes]]:
    """NBD_OPT_LIST_META_CONTEXT's or NBD_OPT_SET_META_CONTEXT's payload: the export name
    and the queries."""
    (name_length,) = struct.unpack_from(">I", data)
    name = data[4 : 4 + name_length]
    at = 4 + name_length
    (count,) = struct.unpack_from(">I", data, at)
    at += 4
    queries = []
    for _ in range(count):
        (length,) = struct.unpack_from(">I", data, at)
        queries.append(data[at + 4 : at + 4 + length])
        at += 4 + length
    return name, queries
