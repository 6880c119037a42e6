"""Run one validated request against a backend and frame its reply.

The protocol core (``protocol/``) validates requests and frames replies but
never touches storage; backends know storage but never build replies
(nbdkit's split).  This is the thin layer between them: it calls the backend
the request names, maps an OSError to the NBD error ("Values / Transmission
phase / Error values"), and asks the core's
:class:`~.protocol.reply_builder.ReplyBuilder` for the bytes.  Reads keep one
copy: the builder allocates the reply and the backend reads into it.

:func:`execute` is safe to call from worker threads: it shares nothing but
the backend (which serves every connection anyway) and the builder (which is
immutable).
"""

from __future__ import annotations

from collections.abc import Sequence

from .backends.base import Backend, ReadPart
from .protocol.constants import Command, CommandFlag
from .protocol.events import Request
from .protocol.reply_builder import ExtentLike, ReplyBuilder, nbd_error
from .protocol.wire import RequestHeader

# Command flag bits as plain ints: RequestHeader.flags is an int on the hot path.
#: A part of a reply: bytes, or for a read's data the backend's own parts.
ReplyPart = ReadPart

_FUA = CommandFlag.FUA.value
_NO_HOLE = CommandFlag.NO_HOLE.value
_FAST_ZERO = CommandFlag.FAST_ZERO.value
# Commands bound once: an enum member is looked up through its class five
# times slower than a module global, and this runs for every request.
_READ, _WRITE, _FLUSH, _TRIM = Command.READ, Command.WRITE, Command.FLUSH, Command.TRIM
_WRITE_ZEROES, _CACHE, _BLOCK_STATUS = Command.WRITE_ZEROES, Command.CACHE, Command.BLOCK_STATUS


# Requests of a blocking backend that move less than this run inline on the
# event loop: a thread-pool round trip costs more than a cached 4 KiB pread.
# Larger transfers, FLUSH and FUA (which wait for the disk) use the pool.
INLINE_BELOW = 64 * 1024


def runs_in_pool(backend: Backend, header: RequestHeader) -> bool:
    """Whether a request should run in a worker thread, off the event loop."""
    return backend.blocking and bool(
        header.length >= INLINE_BELOW or header.command == _FLUSH or header.flags & _FUA
    )


def request_cost(request: Request) -> int:
    """Bytes a request holds in memory: its payload, or the data a read returns.

    A payload received into the store holds none (its event carries no
    payload): it was never buffered, so it never waits for the budget.
    """
    header = request.header
    return len(request.payload) + (header.length if header.command == _READ else 0)


def execute(
    replies: ReplyBuilder, request: Request, backend: Backend, *, zero_copy: bool = False
) -> Sequence[ReplyPart]:
    """Run one validated request; return the parts of its whole reply.

    With ``zero_copy`` (the connection's socket writer sends file regions
    and views as they are) a read's data may be parts of the backend
    itself (:meth:`~.backends.base.Backend.read_parts`).
    """
    header = request.header
    command = header.command
    try:
        if command == _READ:
            return _read(replies, header, backend, zero_copy)
        if command == _BLOCK_STATUS:
            extents = backend.extents(header.length, header.offset)
            ahead = replies.next_data_lookahead(header, extents)
            data_after = None if ahead is None else backend.next_data(ahead)
            return replies.block_status(header, extents, data_after)
        fua = bool(header.flags & _FUA)
        if command == _WRITE:
            if request.in_store:  # the payload was received into the store itself
                backend.commit_write(header.length, header.offset, fua)
            else:
                backend.pwrite(request.payload, header.offset, fua)
        elif command == _FLUSH:
            backend.flush()
        elif command == _TRIM:
            if header.length:
                backend.trim(header.length, header.offset, fua)
        elif command == _WRITE_ZEROES:
            if header.length:
                backend.zero(
                    header.length,
                    header.offset,
                    may_trim=not header.flags & _NO_HOLE,
                    fast=bool(header.flags & _FAST_ZERO),
                    fua=fua,
                )
        elif command == _CACHE and header.length:
            backend.cache(header.length, header.offset)
    except OSError as exc:
        return replies.error(header, nbd_error(exc), exc.strerror or str(exc))
    return replies.ok(header)


def _read(
    replies: ReplyBuilder, header: RequestHeader, backend: Backend, zero_copy: bool
) -> Sequence[ReplyPart]:
    """A read: the builder plans the reply, the backend fills its data regions.

    Or, with ``zero_copy`` and a reply that carries the data in one piece,
    the builder frames it and the backend's own parts follow.
    """
    extents: Sequence[ExtentLike] = ()
    if replies.read_wants_extents(header):
        extents = backend.read_extents(header.length, header.offset)
    if zero_copy:
        head = replies.read_head(header, extents)
        if head is not None:
            parts = backend.read_parts(header.length, header.offset)
            if parts is not None:
                return [head, *parts]
    plan = replies.read(header, extents)
    for region, offset in plan.fills:
        backend.pread_into(region, offset)
    return replies.read_filled(header, plan)
