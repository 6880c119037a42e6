"""The asyncio transport: listening sockets, TLS, connection limits, lifecycle.

This is the only module that does network I/O.  Each connection runs the
sans-IO core (``protocol.handshake`` then ``protocol.transmission``); blocking
backends run in a thread pool so requests on one connection are served
concurrently and may be answered out of order ("Protocol phases /
Transmission": "Replies need not be sent in the same order as requests").

Lifecycle follows qemu-nbd: without ``persistent`` the server exits after its
last client leaves; ``shared`` limits simultaneous clients (0 = unlimited),
and a client beyond the limit gets NBD_REP_ERR_POLICY to every option, as
"Termination of the session during option haggling" asks.  SIGTERM and SIGINT
stop accepting, let in-flight requests finish, flush, and close.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field

from .backends.base import Backend
from .budget import ByteBudget
from .connection import Connection
from .protocol.export import ExportInfo
from .protocol.handshake import HandshakeLimits
from .trace import TraceLog

log = logging.getLogger("reference_server")


@dataclass
class ServerLimits:
    """Resource limits that keep one client from starving the others."""

    # Seconds a client may take to finish option haggling (CVE-2024-7409); 0 = none.
    handshake_timeout: float = 10.0
    # Seconds a client beyond the connection limit waits for a free slot
    # (ungreeted) before it is refused with NBD_REP_ERR_POLICY.
    slot_wait: float = 2.0
    # Clients allowed in option haggling at once; a newcomer beyond it evicts the
    # longest-waiting one, so a crowd of stalled clients cannot lock anyone out.
    max_handshaking: int = 64
    # Requests in flight per connection before it stops reading.
    max_inflight_requests: int = 64
    # Request and reply bytes held in memory, server-wide (see budget.py).
    max_inflight_bytes: int = 64 * 1024 * 1024
    handshake: HandshakeLimits = field(default_factory=HandshakeLimits)


@dataclass
class Export:
    """An export: what the protocol advertises and the storage behind it."""

    info: ExportInfo
    backend: Backend


class NBDServer:
    """Everything connections share: exports, limits, counters, lifecycle."""

    def __init__(
        self,
        exports: Iterable[Export],
        *,
        shared: int = 1,
        persistent: bool = False,
        tls: ssl.SSLContext | None = None,
        limits: ServerLimits | None = None,
        trace: TraceLog | None = None,
        workers: int = 8,
    ) -> None:
        self.exports = {e.info.name: e for e in exports}
        self.infos = {name: e.info for name, e in self.exports.items()}
        self.shared = shared
        self.persistent = persistent
        self.tls = tls
        self.limits = limits or ServerLimits()
        self.trace = trace
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="nbd-io"
        )
        self.connections: set[Connection] = set()
        self.clients = 0  # connections counted against ``shared``
        # Connections still haggling, oldest first.
        self.handshaking: dict[Connection, None] = {}
        # Connections beyond ``shared`` waiting briefly for a slot, oldest first.
        self.waiting: dict[Connection, None] = {}
        self.served_any = False
        self.stopping = False
        self._numbers = 0
        self._servers: list[asyncio.Server] = []
        self.budget = ByteBudget(self.limits.max_inflight_bytes)
        self.done = asyncio.Event()
        self.all_closed = asyncio.Event()  # set when the last connection is gone
        self._tasks: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------- listening

    async def listen(self, sockets: Iterable[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for sock in sockets:
            sock.setblocking(False)
            if sock.family == socket.AF_UNIX:
                server = await loop.create_unix_server(self._new_connection, sock=sock)
            else:
                server = await loop.create_server(self._new_connection, sock=sock)
            self._servers.append(server)

    def _new_connection(self) -> Connection:
        self._numbers += 1
        return Connection(self, self._numbers)

    # ----------------------------------------------------------- lifecycle

    def admit(self) -> str | None:
        """Count a new client, or say why it is refused."""
        if self.stopping:
            return "the server is shutting down"
        if self.shared and self.clients >= self.shared:
            return f"the server allows {self.shared} connection(s) at a time"
        self.clients += 1
        self.served_any = True
        return None

    def release(self) -> None:
        self.clients -= 1
        if self.waiting and not self.stopping:
            waiter = next(iter(self.waiting))
            self.clients += 1
            waiter.admitted()
            return
        if self.clients == 0 and not self.persistent and self.served_any:
            # qemu-nbd without --persistent: exit after the last client.
            self.request_shutdown("the last client left")

    def request_shutdown(self, reason: str) -> None:
        """Start :meth:`shutdown` from a callback (a signal, the last client leaving)."""
        task = asyncio.get_running_loop().create_task(self.shutdown(reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self, reason: str) -> None:
        """Stop accepting, finish in-flight requests, flush, close everything."""
        if self.stopping:
            return
        self.stopping = True
        log.info("shutting down: %s", reason)
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            connection.begin_shutdown()
        waiters = [c.idle.wait() for c in self.connections]
        if waiters:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waiters), timeout=30)
        # Clients told NBD_ESHUTDOWN MUST disconnect; give them a moment to.
        if self.connections:
            self.all_closed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_closed.wait(), timeout=1.0)
        loop = asyncio.get_running_loop()
        for export in self.exports.values():
            try:
                await loop.run_in_executor(self.executor, export.backend.flush)
            except OSError as exc:
                log.error("flush of export %r failed at shutdown: %s", export.info.name, exc)
        for connection in list(self.connections):
            connection.close()
        self.executor.shutdown(wait=True)
        for export in self.exports.values():
            export.backend.close()
        self.done.set()
