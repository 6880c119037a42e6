"""How to reach one NBD server: where it listens, which export, whether over TLS.

The one thing both sides need: the profiles (:mod:`conformance.servers`) make
a :class:`Target` for each server they start or are pointed at, and the
clients (:mod:`conformance.handle` for libnbd, :mod:`conformance.wire` for raw
bytes) connect to a target.  Neither side imports the other.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from urllib.parse import quote


@dataclasses.dataclass(frozen=True)
class Target:
    """An NBD server's address (a Unix socket or host and port), export and TLS.

    ``tls_dir`` holds the client's credentials (a CA and maybe a client
    certificate) when the server needs them; None with ``tls`` means "trust
    whatever certificate the server shows".
    """

    uri: str
    export_name: str
    socket_path: str | None = None
    address: tuple[str, int] | None = None
    tls_dir: str | None = None

    def __post_init__(self) -> None:
        if (self.socket_path is None) == (self.address is None):
            raise ValueError(f"a target has a socket path or an address: {self!r}")

    @property
    def tls(self) -> bool:
        return self.uri.startswith("nbds")

    def open_socket(self, timeout: float = 10.0) -> socket.socket:
        """A connected socket, retried while the server is not listening yet."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.socket_path is not None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.settimeout(timeout)
                    try:
                        sock.connect(self.socket_path)
                    except OSError:
                        sock.close()
                        raise
                    return sock
                assert self.address is not None
                return socket.create_connection(self.address, timeout=timeout)
            except (ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)


def unix_target(
    export_name: str, socket_path: str, tls: bool = False, tls_dir: str | None = None
) -> Target:
    """The target of a server on a Unix socket, with its NBD URI."""
    scheme = "nbds+unix" if tls else "nbd+unix"
    uri = f"{scheme}:///{quote(export_name, safe='')}?socket={quote(socket_path, safe='/')}"
    return Target(uri=uri, export_name=export_name, socket_path=socket_path, tls_dir=tls_dir)
