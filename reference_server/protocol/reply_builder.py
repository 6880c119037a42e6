"""Results into reply bytes: simple replies and structured or extended chunks.

Spec: "Protocol phases / Transmission" (simple reply, structured reply chunk
messages), "Values / Transmission phase" (structured reply types, error
values), "Metadata querying", and for 32-byte headers the EXTENDED_HEADERS
extension.

The builder never calls storage (h11's split: the core frames, a dispatch
layer, ``reference_server/dispatch.py``, runs the command).  A read is built
as a :class:`ReadPlan`: reply buffers allocated at their final size, with the
regions the data goes into named, so storage reads straight into the bytes
that will be sent (one copy, none joined).  Everything here is safe to call
from worker threads: it touches only the request and immutable settings.
"""

from __future__ import annotations

import errno as os_errno
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from . import next_data, wire
from .constants import (
    MAX_EXTENTS_PER_CHUNK,
    MAX_STRING_LENGTH,
    SIMPLE_REPLY_MAGIC,
    ChunkType,
    CommandFlag,
    Errno,
    ReplyFlag,
    StateFlag,
)
from .export import Negotiated
from .wire import RequestHeader

Buffer = bytes | bytearray | memoryview
Tracer = Callable[[str, str, Mapping[str, object]], None]

# errno from storage -> NBD error ("Error values": map EDQUOT and EFBIG to
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

# Command flag bits as plain ints: RequestHeader.flags is an int on the hot path.
_DF = CommandFlag.DF.value
_REQ_ONE = CommandFlag.REQ_ONE.value
_DONE = ReplyFlag.DONE
# Bound once: an enum member is looked up through its class five times
# slower than a module global, and these frame every reply.
_OFFSET_DATA, _OFFSET_HOLE, _NONE = ChunkType.OFFSET_DATA, ChunkType.OFFSET_HOLE, ChunkType.NONE
_ZERO = StateFlag.ZERO.value
_NOT_DONE = ReplyFlag(0)


def nbd_error(exc: OSError) -> Errno:
    """The NBD error value for an OSError raised by storage ("Error values")."""
    return _ERRNO_TO_NBD.get(exc.errno or 0, Errno.EIO)


class ExtentLike(Protocol):
    """A run of the export with one base:allocation status (``backends.base.Extent``)."""

    @property
    def length(self) -> int: ...

    @property
    def flags(self) -> int: ...


@dataclass(slots=True)
class ReadPlan:
    """A read reply whose data regions storage has yet to fill.

    ``buffers`` are the reply as it will be sent; each ``fills`` entry is a
    region of one of them and the export offset its data comes from.  Once
    every region is filled, :meth:`ReplyBuilder.read_filled` hands the
    buffers back (and traces them).
    """

    buffers: list[Buffer]
    fills: list[tuple[memoryview, int]]
    # Trace records (kind, fields) emitted once the data is in; None when not tracing.
    traced: list[tuple[str, dict[str, object]]] | None


class ReplyBuilder:
    """The reply bytes of one connection's transmission phase."""

    def __init__(self, negotiated: Negotiated, *, trace: Tracer | None = None) -> None:
        self._structured = negotiated.structured_replies
        self._extended = negotiated.extended_headers
        self._context_ids = sorted(negotiated.meta_contexts)
        # The ID of x-reference:next-data where selected (only ever with extended headers).
        self._next_data_id = next(
            (i for i, name in negotiated.meta_contexts.items() if name == next_data.NAME), None
        )
        self._size = negotiated.export.size
        self._trace = trace

    # -------------------------------------------------------- no payload

    def ok(self, request: RequestHeader) -> list[Buffer]:
        """Success with no payload: simple reply, or NBD_REPLY_TYPE_NONE when extended."""
        if self._extended:
            if self._trace:
                self._trace_reply(request, "chunk", type=_NONE, flags=_DONE)
            return [wire.pack_chunk_header(request, _DONE, _NONE, 0)]
        if self._trace:
            self._trace_reply(request, "simple reply", error=Errno.OK)
        return [wire.pack_simple_reply(0, request.cookie)]

    def error(self, request: RequestHeader, error: Errno, message: str) -> list[Buffer]:
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
                    flags=_DONE,
                    error=error,
                    message=message,
                )
            return [
                wire.pack_chunk_header(request, _DONE, ChunkType.ERROR, len(payload)),
                payload,
            ]
        if self._trace:
            self._trace_reply(request, "simple reply", error=error, message=message)
        return [wire.pack_simple_reply(error, request.cookie)]

    # -------------------------------------------------------------- reads

    def read_wants_extents(self, request: RequestHeader) -> bool:
        """Whether :meth:`read` can use the allocation of the range (zeroes become holes).

        Only structured replies have OFFSET_HOLE chunks, and NBD_CMD_FLAG_DF
        asks for one content chunk ("Request types / NBD_CMD_READ").
        """
        return self._structured and request.length > 0 and not request.flags & _DF

    def read(self, request: RequestHeader, extents: Sequence[ExtentLike] = ()) -> ReadPlan:
        """The reply to a validated read, each data part a region storage fills.

        ``extents`` (when :meth:`read_wants_extents`) describe the range from
        its offset; runs flagged NBD_STATE_ZERO become OFFSET_HOLE chunks.
        """
        length, offset = request.length, request.offset
        traced: list[tuple[str, dict[str, object]]] | None = [] if self._trace else None
        if not self._structured:
            reply = bytearray(wire.SIMPLE_REPLY.size + length)
            wire.SIMPLE_REPLY.pack_into(reply, 0, SIMPLE_REPLY_MAGIC, 0, request.cookie)
            fills = [(memoryview(reply)[wire.SIMPLE_REPLY.size :], offset)] if length else []
            if traced is not None:
                traced.append(("simple reply", {"error": Errno.OK, "length": length}))
            return ReadPlan([reply], fills, traced)
        if length == 0:
            if self._trace:
                self._trace_reply(request, "chunk", type=_NONE, flags=_DONE)
            return ReadPlan([wire.pack_chunk_header(request, _DONE, _NONE, 0)], [], None)
        plan = ReadPlan([], [], traced)
        if request.flags & _DF or (
            len(extents) == 1 and extents[0].length >= length and not extents[0].flags & _ZERO
        ):
            # DF asks for at most one content chunk, zeroes written out
            # explicitly; a range that is all data needs no more (the common
            # case, answered without the run-merging below).
            self._data_chunk(plan, request, _DONE, offset, length)
            return plan
        # Runs of data and of zeroes: zeroes become OFFSET_HOLE chunks.
        runs: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + length
        pairs = [(e.length, bool(e.flags & _ZERO)) for e in extents]
        for extent_length, zero in [*pairs, (end, False)]:  # a data tail if short
            if pos >= end:
                break
            n = min(extent_length, end - pos)
            if runs and runs[-1][2] == zero:
                runs[-1] = (runs[-1][0], runs[-1][1] + n, zero)
            else:
                runs.append((pos, n, zero))
            pos += n
        last = len(runs) - 1
        for i, (start, n, zero) in enumerate(runs):
            flags = _DONE if i == last else _NOT_DONE
            if not zero:
                self._data_chunk(plan, request, flags, start, n)
                continue
            header = wire.pack_chunk_header(request, flags, _OFFSET_HOLE, 12)
            plan.buffers.append(header + wire.OFFSET_HOLE.pack(start, n))
            if plan.traced is not None:
                plan.traced.append(
                    (
                        "chunk",
                        {
                            "type": _OFFSET_HOLE,
                            "flags": flags,
                            "offset": start,
                            "length": n,
                        },
                    )
                )
        return plan

    def read_head(self, request: RequestHeader, extents: Sequence[ExtentLike] = ()) -> bytes | None:
        """The bytes before a read's data when its reply carries the data in one piece.

        That is a simple reply, or one NBD_REPLY_TYPE_OFFSET_DATA chunk (the
        range is all data, or NBD_CMD_FLAG_DF asks for one chunk); the
        caller sends the data right after.  None when the reply needs more
        (OFFSET_HOLE chunks, or no data at all): use :meth:`read`.
        """
        length, offset = request.length, request.offset
        if not length:
            return None
        if not self._structured:
            if self._trace:
                self._trace_reply(request, "simple reply", error=Errno.OK, length=length)
            return wire.pack_simple_reply(0, request.cookie)
        one_run = len(extents) == 1 and extents[0].length >= length
        if not (request.flags & _DF or (one_run and not extents[0].flags & _ZERO)):
            return None
        header = wire.pack_chunk_header(request, _DONE, _OFFSET_DATA, 8 + length)
        if self._trace:
            self._trace_reply(
                request, "chunk", type=_OFFSET_DATA, flags=_DONE, offset=offset, length=length
            )
        return header + wire.OFFSET_DATA_PREFIX.pack(offset)

    def read_filled(self, request: RequestHeader, plan: ReadPlan) -> list[Buffer]:
        """Storage filled every region of ``plan``: its buffers are the reply."""
        if plan.traced:
            for kind, fields in plan.traced:
                self._trace_reply(request, kind, **fields)
        return plan.buffers

    def _data_chunk(
        self, plan: ReadPlan, request: RequestHeader, flags: ReplyFlag, offset: int, length: int
    ) -> None:
        """One NBD_REPLY_TYPE_OFFSET_DATA chunk: header, offset and data in one buffer."""
        header = wire.pack_chunk_header(request, flags, _OFFSET_DATA, 8 + length)
        start = len(header) + wire.OFFSET_DATA_PREFIX.size
        chunk = bytearray(start + length)
        chunk[: len(header)] = header
        wire.OFFSET_DATA_PREFIX.pack_into(chunk, len(header), offset)
        plan.buffers.append(chunk)
        plan.fills.append((memoryview(chunk)[start:], offset))
        if plan.traced is not None:
            plan.traced.append(
                (
                    "chunk",
                    {
                        "type": _OFFSET_DATA,
                        "flags": flags,
                        "offset": offset,
                        "length": length,
                    },
                )
            )

    # ------------------------------------------------------- block status

    def next_data_lookahead(
        self, request: RequestHeader, extents: Sequence[ExtentLike]
    ) -> int | None:
        """Where storage must say data next begins, for x-reference:next-data (None: no need).

        The dispatch layer asks storage (``Backend.next_data``) and passes
        the answer to :meth:`block_status`.
        """
        if self._next_data_id is None:
            return None
        pairs = [(e.length, int(e.flags)) for e in extents]
        return next_data.lookahead(request.offset, pairs, self._size)

    def block_status(
        self,
        request: RequestHeader,
        extents: Sequence[ExtentLike],
        data_after: int | None = None,
    ) -> list[Buffer]:
        """One block status chunk per negotiated context ("Metadata querying").

        Every context shares base:allocation's extents; x-reference:next-data
        has its own statuses (next_data.py), ``data_after`` being storage's
        answer to :meth:`next_data_lookahead`.
        """
        if not extents:
            return self.error(request, Errno.EIO, "no extents")
        # Compact descriptors have 32-bit lengths; extended ones 64-bit.
        cap = (1 << 64) - 1 if self._extended else 0xFFFFFFFF
        if request.flags & _REQ_ONE:
            first = extents[0]
            pairs = [(min(first.length, request.length, cap), int(first.flags))]
        else:
            pairs = [(min(e.length, cap), int(e.flags)) for e in extents[:MAX_EXTENTS_PER_CHUNK]]
        out: list[Buffer] = []
        ids = self._context_ids
        chunk_type = ChunkType.BLOCK_STATUS_EXT if self._extended else ChunkType.BLOCK_STATUS
        for i, context_id in enumerate(ids):
            flags = _DONE if i == len(ids) - 1 else _NOT_DONE
            described = pairs
            if context_id == self._next_data_id:
                whole = [(e.length, int(e.flags)) for e in extents]
                found = next_data.statuses(request.offset, whole, self._size, data_after)
                described = [(length, found[n]) for n, (length, _) in enumerate(pairs)]
            payload = wire.pack_block_status_payload(context_id, described, self._extended)
            out += [wire.pack_chunk_header(request, flags, chunk_type, len(payload)), payload]
            if self._trace:
                self._trace_reply(
                    request,
                    "chunk",
                    type=chunk_type,
                    flags=flags,
                    context_id=context_id,
                    extents=described[:8],
                )
        return out

    def _trace_reply(self, request: RequestHeader, kind: str, **fields: object) -> None:
        if self._trace:
            self._trace("S", kind, {"cookie": request.cookie, **fields})
