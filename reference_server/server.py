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

from .budget import ByteBudget
from .connection import Connection
from .context import ConnectionContext, Export, OpenConnections, ServerLimits
from .gate import AdmissionGate
from .listener import Listener
from .trace import TraceLog

__all__ = ["Export", "NBDServer", "ServerLimits"]

log = logging.getLogger("reference_server")


class NBDServer:
    """Everything connections share: exports, limits, admission, lifecycle."""

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
        self.limits = limits or ServerLimits()
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="nbd-io"
        )
        admission = self.limits.admission(shared=shared, persistent=persistent)
        self.admission = AdmissionGate(
            admission, lambda: self.request_shutdown("the last client left")
        )
        self.connections = OpenConnections()
        self.context = ConnectionContext(
            exports=self.exports,
            limits=self.limits,
            admission=self.admission,
            budget=ByteBudget(self.limits.max_inflight_bytes),
            executor=self.executor,
            connections=self.connections,
            tls=tls,
            trace=trace,
        )
        self.stopping = False
        self._numbers = 0
        self._listeners: list[Listener] = []
        self.done = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------- listening

    async def listen(self, sockets: Iterable[socket.socket]) -> None:
        """Accept on SOCKETS (already listening) while admission has room."""
        listener = Listener(sockets, self._new_connection, self.admission)
        self._listeners.append(listener)
        listener.start()

    def _new_connection(self) -> Connection:
        self._numbers += 1
        return Connection(self.context, self._numbers)

    # ----------------------------------------------------------- lifecycle

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
        self.admission.stop()
        log.info("shutting down: %s", reason)
        for listener in self._listeners:
            listener.close()
        for connection in self.connections:
            connection.begin_shutdown()
        waiters = [c.idle.wait() for c in self.connections]
        if waiters:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waiters), timeout=30)
        # Clients told NBD_ESHUTDOWN MUST disconnect; give them a moment to.
        if len(self.connections):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.connections.all_closed.wait(), timeout=1.0)
        loop = asyncio.get_running_loop()
        for export in self.exports.values():
            try:
                await loop.run_in_executor(self.executor, export.backend.flush)
            except OSError as exc:
                log.error("flush of export %r failed at shutdown: %s", export.info.name, exc)
        for connection in self.connections:
            connection.close()
        self.admission.close()
        self.executor.shutdown(wait=True)
        for export in self.exports.values():
            export.backend.close()
        self.done.set()
