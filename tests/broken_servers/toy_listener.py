"""The listener of the toy NBD servers: a Unix socket, one thread per connection, one close().

The toys (toy_nbd.py, toy_tls.py, toy_selective.py, toy_huge_read.py) are
written from the spec for the tests that prove the raw-wire checks can fail;
this is the part of them that is not NBD.  Every wait has a timeout: the
accept loop polls a closing flag, close() shuts every connection down and
joins every thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class ToyListener:
    """Listens on SOCKET_PATH and runs :meth:`serve` for each connection on a thread of its own."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.socket_path)
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def serve(self, conn: socket.socket) -> None:
        """Speak NBD on CONN until it ends; exceptions end the connection only."""
        raise NotImplementedError

    def track(self, sock: socket.socket) -> None:
        """Have close() shut SOCK down too (a TLS socket that took over a connection)."""
        self._sockets.append(sock)

    def open_socket(self, timeout: float = 10.0) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(self.socket_path)
        return sock

    def close(self) -> None:
        self._closing.set()
        self._accepter.join(timeout=5)
        self._listener.close()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.track(conn)
            thread = threading.Thread(target=self.serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()
