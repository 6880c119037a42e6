"""Replies written straight to a plain socket: scatter-gather and sendfile, no copies.

asyncio's transports take one buffer per ``write()``: replies made of
several parts are joined first (a copy), and whatever the socket does not
take at once is copied into the transport's own buffer, which it compacts
after every send (more copies).  For a plain (not TLS) socket this writer
sends a reply's parts as they are with ``sendmsg`` (the kernel gathers them
from the backend's memory) and a file's data with ``os.sendfile`` (from the
page cache to the socket, never through Python), and waits for the socket
to become writable itself, on a duplicate of the socket's descriptor.

The transport keeps reading, and closing, the connection.  The reply queue
(``replies.py``) uses this writer only while the transport has nothing
buffered, so the bytes on the wire stay in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Sequence

from .backends.base import FileRegion
from .protocol.transmission import Buffer

# At most this many parts per sendmsg (IOV_MAX is 1024 on Linux).
MAX_PARTS = 512
SEND_BUFFER = 4 * 1024 * 1024


class SocketWriter:
    """Sends to one connection's socket; calls ``on_writable`` once it can take more."""

    def __init__(self, fileno: int, on_writable: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        # A descriptor of our own on the same socket: the loop refuses a
        # writer on the transport's, and closing ours leaves the transport's open.
        self._sock = socket.socket(fileno=os.dup(fileno))
        self._sock.setblocking(False)
        # As large a send buffer as the kernel allows without privileges
        # (net.core.wmem_max): fewer wake-ups per large reply.
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self._on_writable = on_writable
        self.waiting = False

    @classmethod
    def for_transport(
        cls, transport: asyncio.BaseTransport, on_writable: Callable[[], None]
    ) -> SocketWriter | None:
        """A writer for a plain stream socket's transport; None for TLS or anything else."""
        if transport.get_extra_info("sslcontext") is not None:
            return None
        sock = transport.get_extra_info("socket")
        if sock is None or sock.type != socket.SOCK_STREAM:
            return None
        try:
            return cls(sock.fileno(), on_writable)
        except OSError:
            return None

    def send(self, parts: Sequence[Buffer]) -> int:
        """Send what the socket takes now of ``parts``; 0 if it takes nothing."""
        try:
            return self._sock.sendmsg(parts[:MAX_PARTS])
        except (BlockingIOError, InterruptedError):
            return 0

    def sendfile(self, region: FileRegion) -> int:
        """Send what the socket takes now of ``region``; 0 if it takes nothing.

        Raises OSError (EIO) if the file ends before the region does: the
        reply's header promised those bytes.
        """
        try:
            sent = os.sendfile(self._sock.fileno(), region.fd, region.offset, region.length)
        except (BlockingIOError, InterruptedError):
            return 0
        if sent == 0 and region.length:
            raise OSError(5, "file shrank underneath the export")
        return sent

    def wait_writable(self) -> None:
        """Call ``on_writable`` once, when the socket can take more."""
        if not self.waiting:
            self.waiting = True
            self._loop.add_writer(self._sock.fileno(), self._writable)

    def _writable(self) -> None:
        self._loop.remove_writer(self._sock.fileno())
        self.waiting = False
        self._on_writable()

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            if self.waiting:
                self._loop.remove_writer(self._sock.fileno())
                self.waiting = False
            self._sock.close()
