"""One client connection: runs the sans-IO core over an asyncio transport.

Bytes are received straight into their final place (``BufferedProtocol``):
request headers into a reusable buffer, a write payload into the store (a
``Backend.write_view``) or else into the one buffer that reaches the backend.
Requests are served concurrently when the backend blocks (a thread pool), and
replies may leave out of order ("Protocol phases / Transmission": "Replies
need not be sent in the same order as requests").  Replies leave through
replies.py: on a plain socket straight to it (socket_writer.py: sendmsg,
sendfile), under TLS through the transport.  Three things stop the connection
from reading more: too many requests in flight, the server-wide byte budget
(budget.py), and a client that does not read its replies (8 MiB of them queued, replies.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections import deque
from collections.abc import Sequence
from typing import cast

from .admission import Deadline, Expired, Verdict
from .backends.base import Backend
from .budget import ByteBudget
from .connection_phases import CONNECTION_TRANSITIONS, Phase, Trigger
from .context import ConnectionContext
from .dispatch import ReplyPart, execute, request_cost, runs_in_pool
from .gate import Admittee
from .protocol import events
from .protocol.constants import Errno, Reply
from .protocol.export import Negotiated
from .protocol.handshake import Handshake
from .protocol.phases import PhaseMachine
from .protocol.transmission import Transmission
from .replies import ReplyQueue
from .socket_writer import SocketWriter

log = logging.getLogger("reference_server")

# Reply bytes a connection may have queued but not yet handed over before it
# stops taking requests.  A full socket alone does not stop it: the client is
# still reading, and stopping would serialise its I/O with ours.  Memory stays
# bounded by the server-wide byte budget.
MAX_UNSENT = 8 * 1024 * 1024
# Read on every request, bound once: an enum member is looked up through its
# class five times slower than a module global.
_DRAINING = Phase.DRAINING
_SHUTTING_DOWN = Phase.SHUTTING_DOWN


class Connection(asyncio.BufferedProtocol):
    """One client, from accept to close, in the phases of connection_phases.py.

    It is given a :class:`~.context.ConnectionContext` (what it shares with
    the other connections), never the server; admission (who may negotiate,
    the deadlines) is asked through ``context.admission``, which calls back
    :meth:`slot_granted` and :meth:`deadline_passed`.
    """

    def __init__(self, context: ConnectionContext, number: int) -> None:
        self.context = context
        self.number = number
        self.transport: asyncio.Transport | None = None
        self.tracer = context.trace.for_connection(number) if context.trace else None
        self.handshake: Handshake | None = None
        self.transmission: Transmission | None = None
        self.backend: Backend | None = None
        #: Moves only through the table in connection_phases.py (see :meth:`_move`).
        self._phases = PhaseMachine(CONNECTION_TRANSITIONS)
        # Mirrors of the machine's phase, read on every request (the hot path):
        # only _move() changes them, right after the machine.
        self.phase: Phase = self._phases.phase
        self.closing = self.phase is Phase.CLOSED
        self._receive = context.receive_buffer
        self._into_payload = False
        self._queue: deque[tuple[events.Request, bool]] = deque()  # (command, budget taken)
        self._payload_taken = 0  # budget taken for the write payload being received
        self._replies = ReplyQueue(context.budget)
        self._inflight = 0
        self._pumping = False
        self._reading = True
        self.idle = asyncio.Event()
        self.idle.set()
        self._tls_task: asyncio.Task[None] | None = None
        # In TLS_HANDSHAKE: bytes already came through TLS (possibly before
        # start_tls returned), and the handshake core was told.
        self._tls_seen = False

    def _move(self, trigger: Trigger) -> None:
        """The one place the phase changes (the table and its spec sections:
        connection_phases.py)."""
        self._phases.fire(trigger)
        self.phase = self._phases.phase
        self.closing = self.phase is Phase.CLOSED

    # ------------------------------------------------ asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        context = self.context
        context.connections.add(self)
        self.handshake = Handshake(
            context.infos,
            tls_available=context.tls is not None,
            limits=context.limits.handshake,
            trace=self.tracer,
        )
        arrival = context.admission.arrive(self)
        if arrival.verdict is Verdict.ADMITTED:
            self._move(Trigger.ADMITTED)
            self._flush_handshake()
        elif arrival.verdict is Verdict.REFUSED:
            self._refuse(arrival.reason)
        # Verdict.WAIT: ungreeted until slot_granted() or the wait runs out.

    # ------------------------------------------------------------ admission

    def slot_granted(self) -> None:
        """A slot freed up while this client waited: greet it now."""
        if self.phase is not Phase.WAITING_FOR_SLOT:
            return
        self._move(Trigger.ADMITTED)
        self._flush_handshake()
        self._pump_handshake()

    def deadline_passed(self, expired: Expired[Admittee]) -> None:
        if expired.deadline is Deadline.SLOT_WAIT:
            if self.phase is Phase.WAITING_FOR_SLOT:
                self._refuse(expired.reason)
        elif self.phase in (Phase.WAITING_FOR_SLOT, Phase.HANDSHAKE, Phase.TLS_HANDSHAKE):
            self.note(f"closing: {expired.reason}")
            log.info("connection %d: handshake deadline passed: %s", self.number, expired.reason)
            self.close()

    def _refuse(self, reason: str) -> None:
        """Greet, then error every option ("Termination of the session during option haggling")."""
        log.info("connection %d refused: %s", self.number, reason)
        assert self.handshake is not None
        reply = Reply.ERR_SHUTDOWN if self.context.admission.stopping else Reply.ERR_POLICY
        self.handshake.refuse(reply, reason)
        self._move(Trigger.ADMITTED)
        self._flush_handshake()
        self._pump_handshake()

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
            if self.phase is Phase.TLS_HANDSHAKE:
                # Decrypted data can arrive before start_tls() has returned the
                # TLS transport: keep it for the fresh negotiation, answer later.
                if not self._tls_seen:
                    self._tls_seen = True
                    self.handshake.tls_established()
                self.handshake.receive_data(self._receive[:nbytes])
                return
            self.handshake.receive_data(self._receive[:nbytes])
            if self.phase is Phase.HANDSHAKE:
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
        if self not in self.context.connections:
            return  # already released (a failed TLS handshake)
        self._move(Trigger.CLOSE)
        context = self.context
        context.connections.discard(self)
        budget = context.budget
        budget.forget(self._wake)
        # Give back what this connection held; in-flight commands give their own.
        returned = self._payload_taken
        returned += sum(request_cost(event) for event, taken in self._queue if taken)
        self._payload_taken = 0
        self._queue.clear()
        # A write cut off mid-payload leaves what arrived in the store (Backend.write_view).
        if self.transmission and self.backend and (landed := self.transmission.abandon_payload()):
            self.backend.commit_write(*landed, fua=False)
        self._replies.discard()
        self._close_writer()
        budget.give(returned)
        self._update_idle()
        context.admission.depart(self)

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
                self._move(Trigger.STARTTLS)
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
        """Send what the handshake core has to say; the client's next turn starts now."""
        assert self.handshake is not None and self.transport is not None
        out = self.handshake.data_to_send()
        if out:
            self.transport.write(out)
            self.context.admission.progressed(self)

    async def _start_tls(self) -> None:
        assert self.transport is not None and self.context.tls is not None
        loop = asyncio.get_running_loop()
        try:
            new_transport = await loop.start_tls(
                self.transport, self, self.context.tls, server_side=True
            )
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            # "If the handshake is unsuccessful ... the server MUST terminate
            # the session".
            self.note(f"TLS handshake failed: {exc}")
            new_transport = None
        if new_transport is None or self.closing:
            # Closed during the TLS handshake (a failure, the client leaving, a
            # deadline).  asyncio tells no protocol of it (start_tls had handed
            # the socket to its own SSL protocol), so release this one here,
            # or its slot and its place among the negotiating would never
            # come back.
            if new_transport is not None:
                self.transport = new_transport
            self.close()
            self.connection_lost(None)
            return
        self.transport = new_transport
        self.note("TLS established")
        assert self.handshake is not None
        if not self._tls_seen:
            self._tls_seen = True
            self.handshake.tls_established()
        self._move(Trigger.TLS_ESTABLISHED)
        self.context.admission.progressed(self)
        self._pump_handshake()

    def _enter_transmission(self, negotiated: Negotiated, buffered: bytes) -> None:
        self.context.admission.negotiated(self)
        self._move(Trigger.NEGOTIATED)
        self.backend = self.context.exports[negotiated.export.name].backend
        self.transmission = Transmission(
            negotiated, trace=self.tracer, write_target=self.backend.write_view
        )
        assert self.transport is not None
        # On a plain socket, replies go straight to it (replies.py).
        self._replies.writer = SocketWriter.for_transport(self.transport, self.resume_writing)
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
        budget, limit = self.context.budget, self.context.limits.max_inflight_requests
        self._pumping = True
        try:
            self._pump_requests(tx, budget, limit)
        finally:
            self._pumping = False
        held_back = self._replies.unsent > MAX_UNSENT
        self._send(tx.data_to_send())
        if held_back and self._queue and self._replies.unsent <= MAX_UNSENT:
            # The replies that held the queue back left at once (the socket
            # took them all): no resume_writing() will come to say so.
            self._wake()
        self._update_reading()
        self._update_idle()
        # "Terminating the transmission phase": after NBD_CMD_DISC every request
        # received before it is answered, its reply handed over whole, and only
        # then the connection closed (replies still queued here would be lost).
        if (
            self.phase is _DRAINING
            and not self._inflight
            and not self._queue
            and not self._replies.unsent
        ):
            self.close()

    def _pump_requests(self, tx: Transmission, budget: ByteBudget, limit: int) -> None:
        while not self.closing:
            if self._queue:
                if self._replies.unsent > MAX_UNSENT or self._inflight >= limit:
                    break
                queued, taken = self._queue[0]
                if not taken and not budget.try_take(request_cost(queued)):
                    budget.wait(self._wake)
                    break
                self._queue.popleft()
                self._dispatch(queued)
                continue
            if self.phase is _DRAINING:
                break
            event = tx.next_event()
            if type(event) is events.Request:
                taken = bool(self._payload_taken)
                self._payload_taken = 0
                if self.phase is _SHUTTING_DOWN and not event.in_store:
                    # "Terminating the transmission phase": requests received during
                    # shutdown SHOULD fail with NBD_ESHUTDOWN (one in the store runs).
                    error = tx.replies.error(event.header, Errno.ESHUTDOWN, "server shutting down")
                    self._send(error, request_cost(event) if taken else 0)
                    continue
                if (
                    self._inflight < limit
                    and self._replies.unsent <= MAX_UNSENT
                    and (taken or budget.try_take(request_cost(event)))
                ):
                    # Nothing waits before it (the queue is empty here): run it now.
                    self._dispatch(event)
                else:
                    self._queue.append((event, taken))
                continue
            if isinstance(event, events.Close):
                self.note(f"closing: {event.reason}")
                if not event.clean:
                    self._pumping = False
                    self._send(tx.data_to_send())
                    self.close()
                    return
                self._move(Trigger.DISCONNECT)
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
        if runs_in_pool(backend, event.header):
            future = asyncio.get_running_loop().run_in_executor(
                self.context.executor, execute, tx.replies, event, backend
            )
            future.add_done_callback(functools.partial(self._finished, event))
        else:
            zero_copy = self._replies.writer is not None
            self._done(event, execute(tx.replies, event, backend, zero_copy=zero_copy))

    def _finished(self, event: events.Request, future: asyncio.Future[Sequence[ReplyPart]]) -> None:
        try:
            reply = future.result()
        except Exception:  # a bug, not a client error: drop this client, serve others
            log.exception("connection %d: request failed unexpectedly", self.number)
            self._inflight -= 1
            self.context.budget.give(request_cost(event))
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

    def _done(self, event: events.Request, reply: Sequence[ReplyPart]) -> None:
        self._inflight -= 1
        cost = request_cost(event)
        payload = event.payload
        if type(payload) is bytearray:
            # Free the written payload now: a worker thread may hold a reference
            # a little longer, and the budget is about to let another one in.
            with contextlib.suppress(BufferError):
                payload.clear()
        self._send(reply, cost)

    def _send(self, buffers: Sequence[ReplyPart], cost: int = 0) -> None:
        """Queue a reply; ``cost`` returns to the budget once it is all handed over.

        During a pass of :meth:`_pump` nothing is written until the pass ends,
        so its replies leave together.
        """
        if self.closing:
            self.context.budget.give(cost)
            return
        self._replies.add(buffers, cost)
        if not self._pumping:
            self._replies.flush(self.transport)

    def _update_reading(self) -> None:
        tx = self.transmission
        assert tx is not None and self.transport is not None
        blocked = (
            self.phase is _DRAINING
            or bool(self._queue)
            or self._replies.unsent > MAX_UNSENT
            or self._inflight >= self.context.limits.max_inflight_requests
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
        if self.closing:
            return
        self._move(Trigger.SERVER_STOPPING)
        self.transmission.write_target = None  # what is refused must not land
        self._pump()

    def close(self) -> None:
        if self.phase is not Phase.CLOSED:
            self._move(Trigger.CLOSE)
            self.context.admission.negotiated(self)
        # The writer's descriptor would keep the socket open after the transport's.
        self._close_writer()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _close_writer(self) -> None:
        writer, self._replies.writer = self._replies.writer, None
        if writer is not None:
            writer.close()

    def note(self, text: str) -> None:
        if self.tracer is not None:
            self.tracer.note(text)
        log.debug("connection %d: %s", self.number, text)
