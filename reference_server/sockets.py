"""Where the server listens: inherited sockets, a Unix socket, or TCP addresses.

Every socket is listening before the event loop starts, with the largest
backlog the kernel allows, so a client that arrives while the server is not
accepting waits in the kernel's queue instead of being refused.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import stat

__all__ = ["NBD_PORT", "StartupError", "listening_sockets", "tcp_listeners", "unix_listener"]

NBD_PORT = 10809
# Connections the kernel queues while the server is not accepting (at
# --max-handshaking): as many as it allows (net.core.somaxconn caps it).
LISTEN_BACKLOG = socket.SOMAXCONN


class StartupError(Exception):
    """The server cannot start (missing file, busy socket...): exit status 1."""


def listening_sockets(args: argparse.Namespace) -> list[socket.socket]:
    """Systemd socket activation, a Unix socket (``-k``), or TCP sockets (``-b``, ``-p``)."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS"):
        count = int(os.environ["LISTEN_FDS"])
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
        return [socket.socket(fileno=3 + i) for i in range(count)]
    if args.socket:
        return [unix_listener(args.socket)]
    return tcp_listeners(args.bind or "0.0.0.0", args.port or NBD_PORT)


def unix_listener(path: str) -> socket.socket:
    """Bind under a temporary name, listen, then rename: the path appears ready."""
    if len(os.fsencode(path)) > 107:
        raise StartupError(f"socket path is too long for a Unix socket: {path}")
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket from an earlier run
        else:
            raise StartupError(f"{path} exists and is not a socket")
    temporary = f"{path}.{os.getpid()}.tmp"
    if len(os.fsencode(temporary)) > 107:
        temporary = path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(temporary)
        sock.listen(LISTEN_BACKLOG)
        if temporary != path:
            os.rename(temporary, path)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return sock


def tcp_listeners(host: str, port: int) -> list[socket.socket]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve {host!r}: {exc}") from None
    sockets: list[socket.socket] = []
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            for s in sockets:
                s.close()
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        sockets.append(sock)
    return sockets
