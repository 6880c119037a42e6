"""The transmission phase: parse requests, validate them, run them, build replies.

Spec: "Protocol phases / Transmission" (request, simple reply, structured reply
chunk messages; ordering; terminating), "Size constraints", "Metadata
querying", "Values / Transmission phase" (command flags, reply types, request
types, error values), and for 32-byte headers the EXTENDED_HEADERS extension.

:class:`Transmission` is sans-IO: the transport feeds bytes and receives
:class:`~.events.Command` events that are already validated; invalid requests
are answered here with the error the spec names and never reach a backend.
:meth:`Transmission.execute` then runs one command against a backend and
returns the reply's buffers; it is safe to call from worker threads.
"""

from __future__ import annotations

import errno as os_errno
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import wire
from .constants import (
    DEFAULT_MAX_PAYLOAD,
    EXTENDED_REQUEST_MAGIC,
    FLAGS_VALID_FOR,
    MAX_EXTENTS_PER_CHUNK,
    MAX_STRING_LENGTH,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    ChunkType,
    Command,
    CommandFlag,
    Errno,
    ReplyFlag,
    StateFlag,
    TransmissionFlag,
)
from .events import Close, NeedData
from .events import Command as CommandEvent
from .export import Negotiated
from .wire import Request

if TYPE_CHECKING:
    from ..backends.base import Backend

Buffer = bytes | bytearray | memoryview
Tracer = Callable[[str, str, Mapping[str, object]], None]

# errno from a backend -> NBD error ("Error values": map EDQUOT and EFBIG to
# ENOSPC; anything without an NBD meaning becomes EIO).
_ERRNO_TO_NBD = {
    os_errno.EPERM: Errno.EPERM,
    os_errno.EACCES: Errno.EPERM,
    os_errno.EROFS: Errno.EPERM,
    os_errno.EIO: Errno.EIO,
    os_errno.ENOMEM: Errno.ENOMEM,
    os_errno.EINVAL: Errno.EINVAL,
    os_errno.ENOSPC: Errno.ENOSPC,
    os_errno.EDQUOT: Errno.ENOSPC,
    os_errno.EFBIG: Errno.ENOSPC,
    os_errno.EOVERFLOW: Errno.EOVERFLOW,
    os_errno.ENOTSUP: Errno.ENOTSUP,
    os_errno.ESHUTDOWN: Errno.ESHUTDOWN,
}

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
# Command flag bits as plain ints: Request.flags is an int on the hot path.
_FUA = CommandFlag.FUA.value
_NO_HOLE = CommandFlag.NO_HOLE.value
_DF = CommandFlag.DF.value
_REQ_ONE = CommandFlag.REQ_ONE.value
_FAST_ZERO = CommandFlag.FAST_ZERO.value
_PAYLOAD_LEN = CommandFlag.PAYLOAD_LEN.value
_DONE = ReplyFlag.DONE
_ZERO = StateFlag.ZERO.value
_NOT_DONE = ReplyFlag(0)


def nbd_error(exc: OSError) -> Errno:
    """The NBD error value for an OSError raised by a backend."""
    return _ERRNO_TO_NBD.get(exc.errno or 0, Errno.EIO)


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """Why a request was answered with an error before reaching a backend."""

    error: Errno
    message: str


class Transmission:
    """The server side of one connection after option haggling."""

    def __init__(
        self,
        negotiated: Negotiated,
        *,
        trace: Tracer | None = None,
    ) -> None:
        self.negotiated = negotiated
        self._export = negotiated.export
        self._flags = negotiated.flags
        self._structured = negotiated.structured_replies
        self._extended = negotiated.extended_headers
        # Per command: the flag bits it may carry here, as a plain int (hot path).
        self._allowed = {
            command: int(self._allowed_flags(valid)) for command, valid in FLAGS_VALID_FOR.items()
        }
        self._max_payload = negotiated.export.block_sizes.maximum
        self._minimum = negotiated.export.block_sizes.minimum
        self._trace = trace
        self._in = bytearray()
        self._out: list[Buffer] = []
        self._header = wire.EXTENDED_REQUEST if self._extended else wire.REQUEST
        self._unpack = wire.unpack_extended_request if self._extended else wire.unpack_request
        self._expected_magic = EXTENDED_REQUEST_MAGIC if self._extended else REQUEST_MAGIC
        self._closed = False
        # The write payload being received.  Its buffer is allocated at its
        # exact size only when its first bytes are received (see
        # payload_buffer), so a transport can hold back a large payload
        # until it has memory for it.
        self._payload_request: Request | None = None
        self._payload_length = 0
        self._payload: bytearray | None = None
        self._filled = 0
        # Bytes of a rejected request's payload still to be skipped.
        self._discard = 0

    # ------------------------------------------------------------ public API

    def receive_data(self, data: Buffer) -> None:
        """Queue bytes read from the client."""
        if self._closed:
            return
        view = memoryview(data).cast("B")
        if self._discard:
            n = min(self._discard, len(view))
            self._discard -= n
            view = view[n:]
        if view and self._payload_request is not None:
            target = self._payload_target()
            n = min(len(target), len(view))
            target[:n] = view[:n]
            self._filled += n
            view = view[n:]
        if view:
            self._in += view

    def payload_buffer(self) -> memoryview | None:
        """Where the rest of the current write payload should be received, if anywhere.

        Lets a transport read a payload straight into its final buffer (one
        copy) instead of through :meth:`receive_data`.  The first call
        allocates the buffer.
        """
        if self._payload_request is None or self._filled == self._payload_length:
            return None
        return self._payload_target()

    def payload_received(self, nbytes: int) -> None:
        """``nbytes`` were written into the view :meth:`payload_buffer` returned."""
        self._filled += nbytes

    @property
    def pending_payload(self) -> int:
        """Size of the write payload being received (0 when none)."""
        return self._payload_length if self._payload_request is not None else 0

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

    def next_event(self) -> CommandEvent | Close | NeedData:
        while not self._closed:
            if self._discard:
                return NeedData()
            if self._payload_request is not None:
                return self._payload_event()
            size = self._header.size
            if len(self._in) < size:
                return NeedData()
            (magic,) = wire.REQUEST_MAGIC_FIELD.unpack_from(self._in)
            if magic != self._expected_magic:
                self._closed = True
                return Close(f"bad request magic {magic:#x} (expected {self._expected_magic:#x})")
            request = self._unpack(self._in)
            del self._in[:size]
            if self._trace:
                self._traced_request(request)
            payload_length = self._payload_size(request)
            limit = max(self._max_payload, DEFAULT_MAX_PAYLOAD)
            if payload_length > limit:
                # "Size constraints": a payload this large may be deemed a
                # denial of service; it is never read (CVE-2005-3534).
                self._closed = True
                return Close(f"request payload of {payload_length} bytes exceeds {limit}")
            if request.command == Command.DISC:
                # "The server MUST handle all outstanding requests ... and close".
                self._closed = True
                return Close("client sent NBD_CMD_DISC", clean=True)
            rejected = self.validate(request, payload_length)
            if rejected is not None:
                # Answer now; a payload that came with it is read and dropped.
                self._out += self.error_reply(request, rejected.error, rejected.message)
                self._skip(payload_length)
                continue
            if not payload_length:
                return CommandEvent(request, b"")
            self._payload_request = request
            self._payload_length = payload_length
            self._filled = 0
            return self._payload_event()
        return NeedData()

    def _payload_event(self) -> CommandEvent | NeedData:
        """The pending write, once all of its payload is here."""
        assert self._payload_request is not None
        length = self._payload_length
        if self._payload is None:
            if len(self._in) < length:
                return NeedData()
            # All of it arrived with the header: no separate buffer needed.
            payload: Buffer = bytes(self._in[:length])
            del self._in[:length]
        elif self._filled < length:
            return NeedData()
        else:
            payload = self._payload
        event = CommandEvent(self._payload_request, payload)
        self._payload_request, self._payload = None, None
        return event

    def _skip(self, nbytes: int) -> None:
        n = min(nbytes, len(self._in))
        del self._in[:n]
        self._discard = nbytes - n

    def validate(self, request: Request, payload_length: int) -> RequestRejected | None:
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
            if command == Command.WRITE and not has_payload:
                return RequestRejected(Errno.EINVAL, "extended NBD_CMD_WRITE needs PAYLOAD_LEN")
        if self._export.read_only and command in _WRITING:
            return RequestRejected(Errno.EPERM, "the export is read-only")
        if command == Command.TRIM and not self._flags & TransmissionFlag.SEND_TRIM:
            return RequestRejected(Errno.EINVAL, "NBD_CMD_TRIM was not advertised")
        if command == Command.WRITE_ZEROES and not self._flags & TransmissionFlag.SEND_WRITE_ZEROES:
            return RequestRejected(Errno.EINVAL, "NBD_CMD_WRITE_ZEROES was not advertised")
        if command == Command.CACHE and not self._flags & TransmissionFlag.SEND_CACHE:
            return RequestRejected(Errno.EINVAL, "NBD_CMD_CACHE was not advertised")
        if command == Command.BLOCK_STATUS:
            if not self.negotiated.meta_contexts:
                return RequestRejected(Errno.EINVAL, "no metadata context was negotiated")
            if request.length == 0:
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
        if command == Command.READ and request.length > self._max_payload:
            # With structured replies the spec documents EOVERFLOW for a read
            # too large to send; with simple replies the client broke a MUST.
            error = Errno.EOVERFLOW if self._structured else Errno.EINVAL
            return RequestRejected(
                error,
                f"read of {request.length} bytes exceeds the maximum payload {self._max_payload}",
            )
        if command == Command.WRITE and payload_length > self._max_payload:
            return RequestRejected(
                Errno.EINVAL,
                f"write of {payload_length} bytes exceeds the maximum payload {self._max_payload}",
            )
        return None

    def execute(self, event: CommandEvent, backend: Backend) -> list[Buffer]:
        """Run one validated command; return the buffers of its whole reply."""
        request = event.request
        fua = bool(request.flags & _FUA)
        command = request.command
        try:
            if command == Command.READ:
                return self._read(request, backend)
            if command == Command.BLOCK_STATUS:
                return self._block_status(request, backend)
            if command == Command.WRITE:
                backend.pwrite(event.payload, request.offset, fua)
            elif command == Command.FLUSH:
                backend.flush()
            elif command == Command.TRIM:
                if request.length:
                    backend.trim(request.length, request.offset, fua)
            elif command == Command.WRITE_ZEROES:
                if request.length:
                    backend.zero(
                        request.length,
                        request.offset,
                        may_trim=not request.flags & _NO_HOLE,
                        fast=bool(request.flags & _FAST_ZERO),
                        fua=fua,
                    )
            elif command == Command.CACHE and request.length:
                backend.cache(request.length, request.offset)
        except OSError as exc:
            return self.error_reply(request, nbd_error(exc), exc.strerror or str(exc))
        return self.ok_reply(request)

    # --------------------------------------------------------------- replies

    def ok_reply(self, request: Request) -> list[Buffer]:
        """Success with no payload: simple reply, or NBD_REPLY_TYPE_NONE when extended."""
        if self._extended:
            if self._trace:
                self._trace_reply(request, "chunk", type=ChunkType.NONE, flags=ReplyFlag.DONE)
            return [wire.pack_chunk_header(request, ReplyFlag.DONE, ChunkType.NONE, 0)]
        if self._trace:
            self._trace_reply(request, "simple reply", error=Errno.OK)
        return [wire.pack_simple_reply(0, request.cookie)]

    def error_reply(self, request: Request, error: Errno, message: str) -> list[Buffer]:
        """An error: a structured error chunk when negotiated, else a simple reply.

        Reads MUST get a structured reply once negotiated, even for early
        errors; other commands may use either, and the spec prefers the chunk
        because it carries a message.
        """
        if self._structured:
            text = message.encode("utf-8", "replace")[:MAX_STRING_LENGTH]
            payload = wire.pack_error_payload(error, text)
            if self._trace:
                self._trace_reply(
                    request,
                    "chunk",
                    type=ChunkType.ERROR,
                    flags=ReplyFlag.DONE,
                    error=error,
                    message=message,
                )
            return [
                wire.pack_chunk_header(request, ReplyFlag.DONE, ChunkType.ERROR, len(payload)),
                payload,
            ]
        if self._trace:
            self._trace_reply(request, "simple reply", error=error, message=message)
        return [wire.pack_simple_reply(error, request.cookie)]

    def _read(self, request: Request, backend: Backend) -> list[Buffer]:
        """A read reply, each data part built in one buffer the backend reads into."""
        length, offset = request.length, request.offset
        if not self._structured:
            reply = bytearray(wire.SIMPLE_REPLY.size + length)
            wire.SIMPLE_REPLY.pack_into(reply, 0, SIMPLE_REPLY_MAGIC, 0, request.cookie)
            if length:
                backend.pread_into(memoryview(reply)[wire.SIMPLE_REPLY.size :], offset)
            if self._trace:
                self._trace_reply(request, "simple reply", error=Errno.OK, length=length)
            return [reply]
        if length == 0:
            if self._trace:
                self._trace_reply(request, "chunk", type=ChunkType.NONE, flags=ReplyFlag.DONE)
            return [wire.pack_chunk_header(request, ReplyFlag.DONE, ChunkType.NONE, 0)]
        if request.flags & _DF:
            # DF: at most one content chunk, zeroes written out explicitly.
            return [self._data_chunk(request, _DONE, offset, length, backend)]
        # Runs of data and of zeroes: zeroes become OFFSET_HOLE chunks.
        runs: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + length
        extents = [(e.length, bool(e.flags & _ZERO)) for e in backend.read_extents(length, offset)]
        for extent_length, zero in [*extents, (end, False)]:  # a data tail if short
            if pos >= end:
                break
            n = min(extent_length, end - pos)
            if runs and runs[-1][2] == zero:
                runs[-1] = (runs[-1][0], runs[-1][1] + n, zero)
            else:
                runs.append((pos, n, zero))
            pos += n
        out: list[Buffer] = []
        last = len(runs) - 1
        for i, (start, n, zero) in enumerate(runs):
            flags = _DONE if i == last else _NOT_DONE
            if not zero:
                out.append(self._data_chunk(request, flags, start, n, backend))
                continue
            header = wire.pack_chunk_header(request, flags, ChunkType.OFFSET_HOLE, 12)
            out.append(header + wire.OFFSET_HOLE.pack(start, n))
            if self._trace:
                self._trace_reply(
                    request,
                    "chunk",
                    type=ChunkType.OFFSET_HOLE,
                    flags=flags,
                    offset=start,
                    length=n,
                )
        return out

    def _data_chunk(
        self, request: Request, flags: ReplyFlag, offset: int, length: int, backend: Backend
    ) -> bytearray:
        """One NBD_REPLY_TYPE_OFFSET_DATA chunk: header, offset and data in one buffer."""
        header = wire.pack_chunk_header(request, flags, ChunkType.OFFSET_DATA, 8 + length)
        start = len(header) + wire.OFFSET_DATA_PREFIX.size
        chunk = bytearray(start + length)
        chunk[: len(header)] = header
        wire.OFFSET_DATA_PREFIX.pack_into(chunk, len(header), offset)
        backend.pread_into(memoryview(chunk)[start:], offset)
        if self._trace:
            self._trace_reply(
                request,
                "chunk",
                type=ChunkType.OFFSET_DATA,
                flags=flags,
                offset=offset,
                length=length,
            )
        return chunk

    def _block_status(self, request: Request, backend: Backend) -> list[Buffer]:
        extents = backend.extents(request.length, request.offset)
        if not extents:
            return self.error_reply(request, Errno.EIO, "no extents")
        # Compact descriptors have 32-bit lengths; extended ones 64-bit.
        cap = (1 << 64) - 1 if self._extended else 0xFFFFFFFF
        if request.flags & _REQ_ONE:
            first = extents[0]
            pairs = [(min(first.length, request.length, cap), int(first.flags))]
        else:
            pairs = [(min(e.length, cap), int(e.flags)) for e in extents[:MAX_EXTENTS_PER_CHUNK]]
        out: list[Buffer] = []
        ids = sorted(self.negotiated.meta_contexts)
        chunk_type = ChunkType.BLOCK_STATUS_EXT if self._extended else ChunkType.BLOCK_STATUS
        for i, context_id in enumerate(ids):
            flags = _DONE if i == len(ids) - 1 else _NOT_DONE
            payload = wire.pack_block_status_payload(context_id, pairs, self._extended)
            out += [wire.pack_chunk_header(request, flags, chunk_type, len(payload)), payload]
            if self._trace:
                self._trace_reply(
                    request,
                    "chunk",
                    type=chunk_type,
                    flags=flags,
                    context_id=context_id,
                    extents=pairs[:8],
                )
        return out

    # -------------------------------------------------------------- helpers

    def _payload_size(self, request: Request) -> int:
        if self._extended:
            return request.length if request.flags & _PAYLOAD_LEN else 0
        return request.length if request.command == Command.WRITE else 0

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

    def _traced_request(self, request: Request) -> None:
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

    def _trace_reply(self, request: Request, kind: str, **fields: object) -> None:
        if self._trace:
            self._trace("S", kind, {"cookie": request.cookie, **fields})
