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
import functools
import logging
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field

from .backends.base import Backend
from .protocol import events
from .protocol.constants import Command, Reply
from .protocol.export import ExportInfo, Negotiated
from .protocol.handshake import Handshake, HandshakeLimits
from .protocol.transmission import Buffer, Transmission
from .trace import TraceLog

log = logging.getLogger("reference_server")


@dataclass
class ServerLimits:
    """Resource limits that keep one client from starving the others."""

    # Seconds a client may take to finish option haggling (CVE-2024-7409); 0 = none.
    handshake_timeout: float = 10.0
    # Clients allowed in option haggling at once; a newcomer beyond it evicts the
    # longest-waiting one, so a crowd of stalled clients cannot lock anyone out.
    max_handshaking: int = 64
    # Requests and request bytes in flight per connection before reading pauses.
    max_inflight_requests: int = 64
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
        self.served_any = False
        self.stopping = False
        self._numbers = 0
        self._servers: list[asyncio.Server] = []
        self.done = asyncio.Event()
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


class Connection(asyncio.Protocol):
    """One client connection: feeds the sans-IO core and writes what it produces."""

    def __init__(self, server: NBDServer, number: int) -> None:
        self.server = server
        self.number = number
        self.transport: asyncio.Transport | None = None
        self.tracer = server.trace.for_connection(number) if server.trace else None
        self.handshake: Handshake | None = None
        self.transmission: Transmission | None = None
        self.backend: Backend | None = None
        self.counted = False
        self.closing = False
        self.close_after_inflight = False
        self.inflight = 0
        self.inflight_bytes = 0
        self.reading_paused = False
        self.idle = asyncio.Event()
        self.idle.set()
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._in_handshake = False
        self._tls_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        server.connections.add(self)
        if len(server.handshaking) >= server.limits.max_handshaking:
            oldest = next(iter(server.handshaking))
            log.warning("connection %d: evicted, too many clients negotiating", oldest.number)
            oldest._note("closing: evicted by a newer client (too many negotiating)")
            oldest._leave_handshake()
            oldest.close()
        self._in_handshake = True
        server.handshaking[self] = None
        self.handshake = Handshake(
            server.infos,
            tls_available=server.tls is not None,
            limits=server.limits.handshake,
            trace=self.tracer,
        )
        refusal = server.admit()
        if refusal is None:
            self.counted = True
        else:
            log.info("connection %d refused: %s", self.number, refusal)
            reply = Reply.ERR_SHUTDOWN if server.stopping else Reply.ERR_POLICY
            self.handshake.refuse(reply, refusal)
        if server.limits.handshake_timeout:
            loop = asyncio.get_running_loop()
            self._handshake_timer = loop.call_later(
                server.limits.handshake_timeout, self._handshake_timed_out
            )
        self._flush_handshake()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.transmission is not None:
            self.transmission.receive_data(data)
            self._pump_transmission()
        elif self.handshake is not None:
            self.handshake.receive_data(data)
            self._pump_handshake()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._leave_handshake()
        self.server.connections.discard(self)
        if self.counted:
            self.counted = False
            self.server.release()

    # ----------------------------------------------------------- handshake

    def _pump_handshake(self) -> None:
        hs = self.handshake
        assert hs is not None
        while not self.closing:
            event = hs.next_event()
            self._flush_handshake()
            if isinstance(event, events.NeedData):
                return
            if isinstance(event, events.StartTLS):
                self._tls_task = asyncio.get_running_loop().create_task(self._start_tls())
                return
            if isinstance(event, events.Close):
                self._note(f"closing: {event.reason}")
                self.close()
                return
            if isinstance(event, events.EnterTransmission):
                self._enter_transmission(event.negotiated, hs.buffered)
                return

    def _flush_handshake(self) -> None:
        assert self.handshake is not None and self.transport is not None
        out = self.handshake.data_to_send()
        if out:
            self.transport.write(out)

    async def _start_tls(self) -> None:
        assert self.transport is not None and self.server.tls is not None
        loop = asyncio.get_running_loop()
        try:
            new_transport = await loop.start_tls(
                self.transport, self, self.server.tls, server_side=True
            )
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            # "If the handshake is unsuccessful ... the server MUST terminate
            # the session".
            self._note(f"TLS handshake failed: {exc}")
            self.close()
            return
        if new_transport is None or self.closing:
            return
        self.transport = new_transport
        self._note("TLS established")
        assert self.handshake is not None
        self.handshake.tls_established()

    def _handshake_timed_out(self) -> None:
        if self.transmission is None and not self.closing:
            self._note("closing: option haggling took too long")
            log.info("connection %d: handshake timed out", self.number)
            self.close()

    def _leave_handshake(self) -> None:
        if self._in_handshake:
            self._in_handshake = False
            self.server.handshaking.pop(self, None)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    # -------------------------------------------------------- transmission

    def _enter_transmission(self, negotiated: Negotiated, buffered: bytes) -> None:
        self._leave_handshake()
        self.backend = self.server.exports[negotiated.export.name].backend
        self.transmission = Transmission(negotiated, trace=self.tracer)
        self.handshake = None
        if buffered:
            self.transmission.receive_data(buffered)
            self._pump_transmission()

    def _pump_transmission(self) -> None:
        tx, backend = self.transmission, self.backend
        assert tx is not None and backend is not None
        while not (self.closing or self.close_after_inflight or self.reading_paused):
            event = tx.next_event()
            if isinstance(event, events.NeedData):
                break
            if isinstance(event, events.Close):
                self._note(f"closing: {event.reason}")
                if event.clean:
                    self.close_after_inflight = True
                else:
                    self._write(tx.data_to_send())
                    self.close()
                    return
                break
            assert isinstance(event, events.Command)
            if backend.blocking:
                self._started(event)
                future = asyncio.get_running_loop().run_in_executor(
                    self.server.executor, tx.execute, event, backend
                )
                future.add_done_callback(functools.partial(self._finished, event))
            else:
                self._write(tx.data_to_send())
                self._write(tx.execute(event, backend))
        self._write(tx.data_to_send())
        self._maybe_close_when_idle()

    def _started(self, event: events.Command) -> None:
        self.inflight += 1
        self.inflight_bytes += len(event.payload) + (
            event.request.length if event.request.command == Command.READ else 0
        )
        self.idle.clear()
        limits = self.server.limits
        if (
            self.inflight >= limits.max_inflight_requests
            or self.inflight_bytes >= limits.max_inflight_bytes
        ) and not self.reading_paused:
            # Backpressure: stop reading rather than buffer without bound.
            self.reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def _finished(self, event: events.Command, future: asyncio.Future[list[Buffer]]) -> None:
        self.inflight -= 1
        self.inflight_bytes -= len(event.payload) + (
            event.request.length if event.request.command == Command.READ else 0
        )
        try:
            self._write(future.result())
        except Exception:  # a bug, not a client error: keep serving others
            log.exception("connection %d: request failed unexpectedly", self.number)
            self.close()
        if self.inflight == 0:
            self.idle.set()
        limits = self.server.limits
        if (
            self.reading_paused
            and not self.closing
            and not self.server.stopping
            and self.inflight < limits.max_inflight_requests
            and self.inflight_bytes < limits.max_inflight_bytes
        ):
            self.reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
            if self.transmission is not None:
                self._pump_transmission()
        self._maybe_close_when_idle()

    def _maybe_close_when_idle(self) -> None:
        if self.close_after_inflight and self.inflight == 0:
            self.close()

    def _write(self, buffers: list[Buffer]) -> None:
        if buffers and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(buffers)

    # -------------------------------------------------------------- closing

    def begin_shutdown(self) -> None:
        """Server shutdown: stop taking requests; let in-flight ones finish."""
        if self.transmission is None:
            self.close()
            return
        if self.transport is not None and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        self.close_after_inflight = True
        self._maybe_close_when_idle()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _note(self, text: str) -> None:
        if self.tracer is not None:
            self.tracer.note(text)
        log.debug("connection %d: %s", self.number, text)
