"""One client connection: runs the sans-IO core over an asyncio transport.

Bytes are received straight into their final buffer (``BufferedProtocol``):
request headers into a reusable buffer, a write payload into the one buffer
that will reach the backend.  Requests are served concurrently when the
backend blocks (a thread pool), and replies may leave out of order ("Protocol
phases / Transmission": "Replies need not be sent in the same order as
requests").  Three things stop the connection from reading more: too many
requests in flight, the server-wide byte budget (budget.py), and a client that
does not read its replies (8 MiB of them queued, replies.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections import deque
from typing import TYPE_CHECKING

from .backends.base import Backend
from .budget import ByteBudget
from .dispatch import execute
from .protocol import events
from .protocol.constants import Command, CommandFlag, Errno, Reply
from .protocol.export import Negotiated
from .protocol.handshake import Handshake
from .protocol.transmission import Buffer, Transmission
from .replies import ReplyQueue

if TYPE_CHECKING:
    from .server import NBDServer

log = logging.getLogger("reference_server")

RECEIVE_BUFFER = 256 * 1024
# Reply bytes a connection may have queued but not yet handed over before it
# stops taking requests.  A full socket alone does not stop it: the client is
# still reading, and stopping would serialise its I/O with ours.  Memory stays
# bounded by the server-wide byte budget.
MAX_UNSENT = 8 * 1024 * 1024
# Requests of a blocking backend that move less than this run inline on the
# event loop: a thread-pool round trip costs more than a cached 4 KiB pread.
# Larger transfers, FLUSH and FUA (which wait for the disk) use the pool.
INLINE_BELOW = 64 * 1024
_FUA = CommandFlag.FUA.value


def _cost(event: events.Request) -> int:
    """Bytes a request holds in memory: its payload, or the data a read returns."""
    request = event.header
    return len(event.payload) + (request.length if request.command == Command.READ else 0)


class Connection(asyncio.BufferedProtocol):
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
        self.finishing = False  # NBD_CMD_DISC: serve what came, read no more
        self.shutting_down = False  # the server is stopping: new requests get ESHUTDOWN
        self._receive = memoryview(bytearray(RECEIVE_BUFFER))
        self._into_payload = False
        self._queue: deque[tuple[events.Request, bool]] = deque()  # (command, budget taken)
        self._payload_taken = 0  # budget taken for the write payload being received
        self._replies = ReplyQueue(server.budget)
        self._inflight = 0
        self._pumping = False
        self._reading = True
        self.idle = asyncio.Event()
        self.idle.set()
        self._in_handshake = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.waiting_for_slot = False
        self._slot_timer: asyncio.TimerHandle | None = None
        self._tls_task: asyncio.Task[None] | None = None
        # STARTTLS acknowledged: clear-text reading is paused until TLS runs.
        self._tls_pending = False
        # Bytes already came through TLS (possibly before start_tls returned).
        self._tls_seen = False

    # ------------------------------------------------ asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        server.connections.add(self)
        if len(server.handshaking) >= server.limits.max_handshaking:
            oldest = next(iter(server.handshaking))
            log.warning("connection %d: evicted, too many clients negotiating", oldest.number)
            oldest.note("closing: evicted by a newer client (too many negotiating)")
            oldest.close()
        self._in_handshake = True
        server.handshaking[self] = None
        self.handshake = Handshake(
            server.infos,
            tls_available=server.tls is not None,
            limits=server.limits.handshake,
            trace=self.tracer,
        )
        if server.limits.handshake_timeout:
            self._handshake_timer = asyncio.get_running_loop().call_later(
                server.limits.handshake_timeout, self._handshake_timed_out
            )
        refusal = server.admit()
        if refusal is None:
            self.counted = True
        elif not server.stopping and server.limits.slot_wait:
            # Full: wait a little for a slot before refusing, as a client that
            # connects just after another left should not lose a race.
            self.waiting_for_slot = True
            server.waiting[self] = None
            self._slot_timer = asyncio.get_running_loop().call_later(
                server.limits.slot_wait, self._refuse, refusal
            )
            return
        else:
            self._refuse(refusal)
            return
        self._flush_handshake()

    def admitted(self) -> None:
        """A slot freed up while this client waited: greet it now."""
        self._stop_waiting()
        self.counted = True
        self._flush_handshake()
        self._pump_handshake()

    def _refuse(self, reason: str) -> None:
        """Greet, then error every option ("Termination of the session during option haggling")."""
        self._stop_waiting()
        log.info("connection %d refused: %s", self.number, reason)
        assert self.handshake is not None
        reply = Reply.ERR_SHUTDOWN if self.server.stopping else Reply.ERR_POLICY
        self.handshake.refuse(reply, reason)
        self._flush_handshake()
        self._pump_handshake()

    def _stop_waiting(self) -> None:
        self.waiting_for_slot = False
        self.server.waiting.pop(self, None)
        if self._slot_timer is not None:
            self._slot_timer.cancel()
            self._slot_timer = None

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.transmission is not None:
            target = self.transmission.payload_buffer()
            if target is not None:
                self._into_payload = True
                return target
        self._into_payload = False
        return self._receive

    def buffer_updated(self, nbytes: int) -> None:
        if self.closing:
            return
        try:
            self._received(nbytes)
        except Exception:
            # A bug must cost one connection, not the server (nor a traceback
            # from asyncio's fatal-error path).
            log.exception("connection %d: internal error; closing it", self.number)
            self.close()

    def _received(self, nbytes: int) -> None:
        if self.transmission is not None:
            if self._into_payload:
                self.transmission.payload_received(nbytes)
            else:
                self.transmission.receive_data(self._receive[:nbytes])
            self._pump()
        elif self.handshake is not None:
            if self._tls_pending:
                # Decrypted data can arrive before start_tls() has returned the
                # TLS transport: keep it for the fresh negotiation, answer later.
                if not self._tls_seen:
                    self._tls_seen = True
                    self.handshake.tls_established()
                self.handshake.receive_data(self._receive[:nbytes])
                return
            self.handshake.receive_data(self._receive[:nbytes])
            if not self.waiting_for_slot:
                self._pump_handshake()

    def eof_received(self) -> bool | None:
        return None  # the client is gone: close our side too

    def pause_writing(self) -> None:
        self._replies.paused = True

    def resume_writing(self) -> None:
        self._replies.paused = False
        self._replies.flush(self.transport)
        if self.transmission is not None:
            self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._leave_handshake()
        self._stop_waiting()
        self.server.connections.discard(self)
        if not self.server.connections:
            self.server.all_closed.set()
        budget = self.server.budget
        budget.forget(self._wake)
        # Give back what this connection held; in-flight commands give their own.
        returned = self._payload_taken
        returned += sum(_cost(event) for event, taken in self._queue if taken)
        self._payload_taken = 0
        self._queue.clear()
        self._replies.discard()
        budget.give(returned)
        self._update_idle()
        if self.counted:
            self.counted = False
            self.server.release()

    # ------------------------------------------------------------ handshake

    def _pump_handshake(self) -> None:
        hs = self.handshake
        assert hs is not None
        while not self.closing:
            event = hs.next_event()
            self._flush_handshake()
            if isinstance(event, events.NeedData):
                return
            if isinstance(event, events.StartTLS):
                # Whatever the client sends next is TLS: stop reading in clear
                # now, before start_tls() takes over the socket.
                assert self.transport is not None
                self.transport.pause_reading()
                self._tls_pending = True
                self._tls_task = asyncio.get_running_loop().create_task(self._start_tls())
                return
            if isinstance(event, events.Close):
                self.note(f"closing: {event.reason}")
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
            self.note(f"TLS handshake failed: {exc}")
            self.close()
            return
        if new_transport is None or self.closing:
            return
        self.transport = new_transport
        self.note("TLS established")
        assert self.handshake is not None
        if not self._tls_seen:
            self._tls_seen = True
            self.handshake.tls_established()
        self._tls_pending = False
        self._pump_handshake()

    def _handshake_timed_out(self) -> None:
        if self.transmission is None and not self.closing:
            self.note("closing: option haggling took too long")
            log.info("connection %d: handshake timed out", self.number)
            self.close()

    def _leave_handshake(self) -> None:
        if self._in_handshake:
            self._in_handshake = False
            self.server.handshaking.pop(self, None)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def _enter_transmission(self, negotiated: Negotiated, buffered: bytes) -> None:
        self._leave_handshake()
        self.backend = self.server.exports[negotiated.export.name].backend
        self.transmission = Transmission(negotiated, trace=self.tracer)
        self.handshake = None
        if buffered:
            self.transmission.receive_data(buffered)
        self._pump()

    # --------------------------------------------------------- transmission

    def _pump(self) -> None:
        """Parse, queue and dispatch requests as far as the limits allow."""
        tx = self.transmission
        if tx is None or self.closing:
            return
        budget, limit = self.server.budget, self.server.limits.max_inflight_requests
        self._pumping = True
        try:
            self._pump_requests(tx, budget, limit)
        finally:
            self._pumping = False
        self._send(tx.data_to_send())
        self._update_reading()
        self._update_idle()
        if self.finishing and not self._inflight and not self._queue:
            self.close()

    def _pump_requests(self, tx: Transmission, budget: ByteBudget, limit: int) -> None:
        while not self.closing:
            if self._queue:
                if self._replies.unsent > MAX_UNSENT or self._inflight >= limit:
                    break
                queued, taken = self._queue[0]
                if not taken and not budget.try_take(_cost(queued)):
                    budget.wait(self._wake)
                    break
                self._queue.popleft()
                self._dispatch(queued)
                continue
            if self.finishing:
                break
            event = tx.next_event()
            if isinstance(event, events.Request):
                taken = bool(self._payload_taken)
                self._payload_taken = 0
                if self.shutting_down:
                    # "Terminating the transmission phase": requests received
                    # during shutdown SHOULD fail with NBD_ESHUTDOWN.
                    error = tx.replies.error(event.header, Errno.ESHUTDOWN, "server shutting down")
                    self._send(error, _cost(event) if taken else 0)
                    continue
                self._queue.append((event, taken))
                continue
            if isinstance(event, events.Close):
                self.note(f"closing: {event.reason}")
                if not event.clean:
                    self._pumping = False
                    self._send(tx.data_to_send())
                    self.close()
                    return
                self.finishing = True
                continue
            # NeedData: a write payload may have started; take its budget first.
            pending = tx.pending_payload
            if pending and not self._payload_taken:
                if budget.try_take(pending):
                    self._payload_taken = pending
                else:
                    budget.wait(self._wake)
            break

    def _dispatch(self, event: events.Request) -> None:
        tx, backend = self.transmission, self.backend
        assert tx is not None and backend is not None
        self._inflight += 1
        request = event.header
        if backend.blocking and (
            request.command == Command.FLUSH
            or request.flags & _FUA
            or request.length >= INLINE_BELOW
        ):
            future = asyncio.get_running_loop().run_in_executor(
                self.server.executor, execute, tx.replies, event, backend
            )
            future.add_done_callback(functools.partial(self._finished, event))
        else:
            self._done(event, execute(tx.replies, event, backend))

    def _finished(self, event: events.Request, future: asyncio.Future[list[Buffer]]) -> None:
        try:
            reply = future.result()
        except Exception:  # a bug, not a client error: drop this client, serve others
            log.exception("connection %d: request failed unexpectedly", self.number)
            self._inflight -= 1
            self.server.budget.give(_cost(event))
            self.close()
            return
        self._done(event, reply)
        self._wake()

    def _wake(self) -> None:
        """Pump on the next loop iteration, once the caller's references are gone.

        A finished request's payload must be freed before the next one is
        allocated, or two large payloads would briefly coexist.
        """
        asyncio.get_running_loop().call_soon(self._pump)

    def _done(self, event: events.Request, reply: list[Buffer]) -> None:
        self._inflight -= 1
        cost = _cost(event)
        if isinstance(event.payload, bytearray):
            # Free the written payload now: a worker thread may hold a reference
            # a little longer, and the budget is about to let another one in.
            with contextlib.suppress(BufferError):
                event.payload.clear()
        self._send(reply, cost)

    def _send(self, buffers: list[Buffer], cost: int = 0) -> None:
        """Queue a reply; ``cost`` returns to the budget once it is all handed over.

        During a pass of :meth:`_pump` nothing is written until the pass ends,
        so its replies leave together.
        """
        if self.closing:
            self.server.budget.give(cost)
            return
        self._replies.add(buffers, cost)
        if not self._pumping:
            self._replies.flush(self.transport)

    def _update_reading(self) -> None:
        tx = self.transmission
        assert tx is not None and self.transport is not None
        blocked = (
            self.finishing
            or bool(self._queue)
            or self._replies.unsent > MAX_UNSENT
            or self._inflight >= self.server.limits.max_inflight_requests
            or bool(tx.pending_payload and not self._payload_taken)
        )
        if blocked and self._reading:
            self._reading = False
            self.transport.pause_reading()
        elif not blocked and not self._reading:
            self._reading = True
            self.transport.resume_reading()

    def _update_idle(self) -> None:
        if self._inflight or self._queue:
            self.idle.clear()
        else:
            self.idle.set()

    # -------------------------------------------------------------- closing

    def begin_shutdown(self) -> None:
        """Server shutdown: finish received requests, fail new ones with ESHUTDOWN."""
        if self.transmission is None:
            self.close()
            return
        self.shutting_down = True
        self._pump()

    def close(self) -> None:
        self.closing = True
        self._leave_handshake()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def note(self, text: str) -> None:
        if self.tracer is not None:
            self.tracer.note(text)
        log.debug("connection %d: %s", self.number, text)
