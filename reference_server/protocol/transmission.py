"""The transmission phase: parse requests, validate them, frame replies.

Spec: "Protocol phases / Transmission" (request message; ordering;
terminating), "Size constraints", "Metadata querying", "Values / Transmission
phase" (command flags, request types, error values), and for 32-byte headers
the EXTENDED_HEADERS extension.

:class:`Transmission` is sans-IO and never calls storage: the transport feeds
bytes and receives :class:`~.events.Request` events that are already
validated; invalid requests are answered here with the error the spec names
and never reach storage.  The one thing it may ask of the outside is where
to receive an accepted write's payload (``write_target``, a view of the
store: the payload then lands in place, and the request says so).
Running a request is the dispatch layer's job
(``reference_server/dispatch.py``), which frames the result with
:attr:`Transmission.replies` (a :class:`~.reply_builder.ReplyBuilder`).
What the parser expects next is a :class:`~.phases.TransmissionPhase`,
changed only through ``TRANSMISSION_TRANSITIONS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import wire
from .constants import (
    DEFAULT_MAX_PAYLOAD,
    EXTENDED_REQUEST_MAGIC,
    FLAGS_VALID_FOR,
    REQUEST_MAGIC,
    Command,
    CommandFlag,
    Errno,
    TransmissionFlag,
)
from .events import Close, NeedData, Request
from .export import Negotiated
from .phases import (
    TRANSMISSION_TRANSITIONS,
    PhaseMachine,
    TransmissionPhase,
    TransmissionTrigger,
)
from .reply_builder import Buffer, ReplyBuilder, Tracer, nbd_error
from .wire import RequestHeader

__all__ = ["Buffer", "RequestRejected", "Transmission", "WriteTarget", "nbd_error"]

#: Where a validated write's payload may be received in place: given its
#: length and offset, a writable view of the store, or None
#: (``Backend.write_view``; the core only ever calls it, never storage itself).
WriteTarget = Callable[[int, int], memoryview | None]


# Commands whose range must lie inside the export, and the error when it does
# not ("Error values": ENOSPC for writes, EINVAL for reads and trims).
_RANGE_ERROR = {
    Command.READ: Errno.EINVAL,
    Command.WRITE: Errno.ENOSPC,
    Command.TRIM: Errno.EINVAL,
    Command.CACHE: Errno.EINVAL,
    Command.WRITE_ZEROES: Errno.ENOSPC,
    Command.BLOCK_STATUS: Errno.EINVAL,
}
_WRITING = (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)
# Commands a transmission flag must advertise before a client may send them.
_ADVERTISED_BY = {
    Command.TRIM: TransmissionFlag.SEND_TRIM,
    Command.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
    Command.CACHE: TransmissionFlag.SEND_CACHE,
}
# Members read on every request, bound once: an enum member is looked up
# through its class five times slower than a module global.
_READ, _WRITE, _DISC = Command.READ, Command.WRITE, Command.DISC
_BLOCK_STATUS = Command.BLOCK_STATUS
# Command flag bits as plain ints: RequestHeader.flags is an int on the hot path.
_PAYLOAD_LEN = CommandFlag.PAYLOAD_LEN.value
_AWAITING_REQUEST = TransmissionPhase.AWAITING_REQUEST
_RECEIVING_PAYLOAD = TransmissionPhase.RECEIVING_PAYLOAD
_DISCARDING_PAYLOAD = TransmissionPhase.DISCARDING_PAYLOAD
_CLOSED = TransmissionPhase.CLOSED


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """Why a request was answered with an error before reaching storage."""

    error: Errno
    message: str


class Transmission:
    """The server side of one connection after option haggling."""

    def __init__(
        self,
        negotiated: Negotiated,
        *,
        trace: Tracer | None = None,
        write_target: WriteTarget | None = None,
    ) -> None:
        self.negotiated = negotiated
        #: Asked for a view of the store for each accepted NBD_CMD_WRITE (None:
        #: never; the transport may clear it, e.g. once it is shutting down).
        self.write_target = write_target
        self._export = negotiated.export
        self._flags = negotiated.flags
        self._structured = negotiated.structured_replies
        self._extended = negotiated.extended_headers
        # Per command: the flag bits it may carry here, as a plain int (hot path).
        self._allowed = {
            command: int(self._allowed_flags(valid)) for command, valid in FLAGS_VALID_FOR.items()
        }
        # Per command: the error that refuses it outright on this connection
        # (nothing depends on the request's fields), decided once here.
        self._refused = {
            command: refused
            for command in FLAGS_VALID_FOR
            if (refused := self._refusal(command)) is not None
        }
        self._max_payload = negotiated.export.block_sizes.maximum
        # "Size constraints": a larger payload is never read.
        self._payload_limit = max(self._max_payload, DEFAULT_MAX_PAYLOAD)
        self._minimum = negotiated.export.block_sizes.minimum
        self._trace = trace
        #: Frames this connection's replies; the dispatch layer uses it too.
        self.replies = ReplyBuilder(negotiated, trace=trace)
        self._in = bytearray()
        self._out: list[Buffer] = []
        self._header = wire.EXTENDED_REQUEST if self._extended else wire.REQUEST
        self._unpack = wire.unpack_extended_request if self._extended else wire.unpack_request
        self._expected_magic = EXTENDED_REQUEST_MAGIC if self._extended else REQUEST_MAGIC
        # The phase changes only through TRANSMISSION_TRANSITIONS (phases.py).
        self._phases = PhaseMachine(TRANSMISSION_TRANSITIONS)
        # RECEIVING_PAYLOAD: the write whose payload is being received.  Either
        # into the store itself (a view from write_target: _in_store), or into
        # a buffer allocated at its exact size only when its first bytes are
        # received (see payload_buffer), so that a transport can hold back a
        # large payload until it has memory for it.
        self._payload_header: RequestHeader | None = None
        self._payload_length = 0
        self._payload: bytearray | memoryview | None = None
        self._in_store = False
        self._filled = 0
        # DISCARDING_PAYLOAD: bytes of a rejected request's payload still to
        # skip, and its error reply, sent once the last of them is read.
        self._discard = 0
        self._discarded_reply: list[Buffer] = []

    # ------------------------------------------------------------ public API

    @property
    def phase(self) -> TransmissionPhase:
        return self._phases.phase

    def receive_data(self, data: Buffer) -> None:
        """Queue bytes read from the client."""
        phase = self._phases.phase
        if phase is _CLOSED:
            return
        view = memoryview(data).cast("B")
        if phase is _DISCARDING_PAYLOAD:
            n = min(self._discard, len(view))
            self._discard -= n
            view = view[n:]
            if not self._discard:
                self._phases.fire(TransmissionTrigger.PAYLOAD_DISCARDED)
                self._out += self._discarded_reply
                self._discarded_reply = []
        elif view and phase is _RECEIVING_PAYLOAD:
            target = self._payload_target()
            n = min(len(target), len(view))
            target[:n] = view[:n]
            self._filled += n
            view = view[n:]
        if view:
            self._in += view

    def payload_buffer(self) -> memoryview | None:
        """Where the rest of the current write payload should be received, if anywhere.

        Lets a transport read a payload straight into its final place: the
        store itself when ``write_target`` offered a view of it (no copy at
        all), else a buffer for the backend (one copy), which the first call
        allocates.
        """
        if self._phases.phase is not _RECEIVING_PAYLOAD or self._filled == self._payload_length:
            return None
        return self._payload_target()

    def payload_received(self, nbytes: int) -> None:
        """``nbytes`` were written into the view :meth:`payload_buffer` returned."""
        self._filled += nbytes

    @property
    def pending_payload(self) -> int:
        """Bytes of memory the write payload being received needs (0 when none,
        or when it is received into the store, which costs nothing more)."""
        if self._phases.phase is not _RECEIVING_PAYLOAD or self._in_store:
            return 0
        return self._payload_length

    def abandon_payload(self) -> tuple[int, int] | None:
        """The connection is lost: drop the write being received.

        Returns (length, offset) of what of it already landed in the store,
        if it was received there: that prefix stays (the transport commits
        it, so the store's bookkeeping covers it).  The write never completed,
        so nothing was promised about its range, as for a disk write cut by
        a power failure.
        """
        header, landed = self._payload_header, self._filled if self._in_store else 0
        self._payload_header, self._payload, self._in_store = None, None, False
        if header is None or not landed:
            return None
        return landed, header.offset

    def _payload_target(self) -> memoryview:
        if self._payload is None:
            self._payload = bytearray(self._payload_length)
            # Bytes that arrived with the header belong to the payload.
            n = len(self._in)
            self._payload[:n] = self._in
            self._in.clear()
            self._filled = n
        return memoryview(self._payload)[self._filled :]

    def data_to_send(self) -> list[Buffer]:
        """Replies the parser produced itself (errors for rejected requests)."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> Request | Close | NeedData:
        while True:
            phase = self._phases.phase
            if phase is _RECEIVING_PAYLOAD:
                return self._payload_event()
            if phase is not _AWAITING_REQUEST:  # discarding a payload, or closed
                return NeedData()
            size = self._header.size
            if len(self._in) < size:
                return NeedData()
            (magic,) = wire.REQUEST_MAGIC_FIELD.unpack_from(self._in)
            if magic != self._expected_magic:
                self._phases.fire(TransmissionTrigger.BAD_MAGIC)
                return Close(f"bad request magic {magic:#x} (expected {self._expected_magic:#x})")
            request = self._unpack(self._in)
            del self._in[:size]
            if self._trace:
                self._traced_request(request)
            payload_length = self._payload_size(request)
            limit = self._payload_limit
            if payload_length > limit:
                # "Size constraints": a payload this large may be deemed a
                # denial of service; it is never read (CVE-2005-3534).
                self._phases.fire(TransmissionTrigger.PAYLOAD_TOO_LARGE)
                return Close(f"request payload of {payload_length} bytes exceeds {limit}")
            if request.command == _DISC:
                # "The server MUST handle all outstanding requests ... and close".
                self._phases.fire(TransmissionTrigger.DISC_RECEIVED)
                return Close("client sent NBD_CMD_DISC", clean=True)
            rejected = self.validate(request, payload_length)
            if rejected is not None:
                # A payload that came with it is read and dropped, and only then
                # answered: a reply to a request still being sent matches no
                # request the client has finished issuing (libnbd drops the
                # connection: "no matching cookie found for server reply").
                reply = self.replies.error(request, rejected.error, rejected.message)
                if self._skip(payload_length):
                    self._discarded_reply = reply
                else:
                    self._out += reply
                continue
            if not payload_length:
                return Request(request, b"")
            target = self.write_target
            if target is not None and request.command == _WRITE:
                view = target(payload_length, request.offset)
                if view is not None:
                    return self._receive_in_store(request, view)
            if len(self._in) >= payload_length:
                # All of it arrived with the header: no separate buffer needed.
                payload = bytes(self._in[:payload_length])
                del self._in[:payload_length]
                return Request(request, payload)
            self._phases.fire(TransmissionTrigger.PAYLOAD_EXPECTED)
            self._payload_header = request
            self._payload_length = payload_length
            self._filled = 0
            return self._payload_event()

    def _receive_in_store(self, request: RequestHeader, view: memoryview) -> Request | NeedData:
        """Receive a write's payload into ``view``, starting with what came with its header."""
        n = min(len(self._in), len(view))
        if n:
            with memoryview(self._in) as arrived:  # (a slice of the bytearray would copy)
                view[:n] = arrived[:n]
            del self._in[:n]
        if n == len(view):
            return Request(request, b"", in_store=True)
        self._phases.fire(TransmissionTrigger.PAYLOAD_EXPECTED)
        self._payload_header, self._payload_length = request, len(view)
        self._payload, self._filled, self._in_store = view, n, True
        return NeedData()

    def _payload_event(self) -> Request | NeedData:
        """The pending write, once all of its payload is here."""
        assert self._payload_header is not None
        length = self._payload_length
        payload: Buffer
        if self._in_store:
            if self._filled < length:
                return NeedData()
            self._phases.fire(TransmissionTrigger.PAYLOAD_RECEIVED)
            event = Request(self._payload_header, b"", in_store=True)
            self._payload_header, self._payload, self._in_store = None, None, False
            return event
        if self._payload is None:
            if len(self._in) < length:
                return NeedData()
            # The rest came through receive_data before a buffer was asked for.
            payload = bytes(self._in[:length])
            del self._in[:length]
        elif self._filled < length:
            return NeedData()
        else:
            payload = self._payload
        self._phases.fire(TransmissionTrigger.PAYLOAD_RECEIVED)
        event = Request(self._payload_header, payload)
        self._payload_header, self._payload = None, None
        return event

    def _skip(self, nbytes: int) -> bool:
        """Drop a rejected request's payload: what is here now, the rest as it comes.

        True if some of it is still to come.
        """
        n = min(nbytes, len(self._in))
        del self._in[:n]
        self._discard = nbytes - n
        if self._discard:
            self._phases.fire(TransmissionTrigger.REJECTED_WITH_PAYLOAD)
        return bool(self._discard)

    def validate(self, request: RequestHeader, payload_length: int) -> RequestRejected | None:
        """The error the spec names for a bad request, or None if it may run."""
        command, flags = request.command, request.flags
        allowed = self._allowed.get(command)
        if allowed is None:
            return RequestRejected(Errno.EINVAL, f"unknown command {command.name}")
        if flags & ~allowed:
            return RequestRejected(
                Errno.EINVAL,
                f"flags {CommandFlag(flags & ~allowed)!r} are not valid for {command.name}",
            )
        if self._extended:
            has_payload = bool(flags & _PAYLOAD_LEN)
            if command == _WRITE and not has_payload:
                return RequestRejected(Errno.EINVAL, "extended NBD_CMD_WRITE needs PAYLOAD_LEN")
        refused = self._refused.get(command)
        if refused is not None:
            return refused
        if command == _BLOCK_STATUS and request.length == 0:
            return RequestRejected(Errno.EINVAL, "block status of zero length")
        range_error = _RANGE_ERROR.get(command)
        if range_error is not None:
            if request.offset + request.length > self._export.size:
                return RequestRejected(
                    range_error,
                    f"range {request.offset}+{request.length} "
                    f"is beyond the export size {self._export.size}",
                )
            if self._minimum > 1 and (request.offset | request.length) % self._minimum:
                return RequestRejected(
                    Errno.EINVAL,
                    f"request is not aligned to the minimum block size {self._minimum}",
                )
        if command == _READ and request.length > self._max_payload:
            # With structured replies the spec documents EOVERFLOW for a read
            # too large to send; with simple replies the client broke a MUST.
            error = Errno.EOVERFLOW if self._structured else Errno.EINVAL
            return RequestRejected(
                error,
                f"read of {request.length} bytes exceeds the maximum payload {self._max_payload}",
            )
        if command == _WRITE and payload_length > self._max_payload:
            return RequestRejected(
                Errno.EINVAL,
                f"write of {payload_length} bytes exceeds the maximum payload {self._max_payload}",
            )
        return None

    # -------------------------------------------------------------- helpers

    def _payload_size(self, request: RequestHeader) -> int:
        if self._extended:
            return request.length if request.flags & _PAYLOAD_LEN else 0
        return request.length if request.command == _WRITE else 0

    def _refusal(self, command: Command) -> RequestRejected | None:
        """Why ``command`` is refused whatever its fields, on this connection (None: it is not)."""
        if self._export.read_only and command in _WRITING:
            return RequestRejected(Errno.EPERM, "the export is read-only")
        needed = _ADVERTISED_BY.get(command)
        if needed is not None and not self._flags & needed:
            return RequestRejected(Errno.EINVAL, f"NBD_CMD_{command.name} was not advertised")
        if command == _BLOCK_STATUS and not self.negotiated.meta_contexts:
            return RequestRejected(Errno.EINVAL, "no metadata context was negotiated")
        return None

    def _allowed_flags(self, valid: CommandFlag) -> CommandFlag:
        """Of a command's ``valid`` flags, those usable given what was negotiated."""
        allowed = valid
        if not self._flags & TransmissionFlag.SEND_FUA:
            allowed &= ~CommandFlag.FUA
        if not self._flags & TransmissionFlag.SEND_DF:
            allowed &= ~CommandFlag.DF
        if not self._flags & TransmissionFlag.SEND_FAST_ZERO:
            allowed &= ~CommandFlag.FAST_ZERO
        if not self._extended:
            allowed &= ~CommandFlag.PAYLOAD_LEN
        return allowed

    def _traced_request(self, request: RequestHeader) -> None:
        if self._trace:
            self._trace(
                "C",
                "request",
                {
                    "command": request.command,
                    "flags": CommandFlag(request.flags),
                    "cookie": request.cookie,
                    "offset": request.offset,
                    "length": request.length,
                },
            )
