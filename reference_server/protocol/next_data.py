"""``x-reference:next-data``: where data next begins, a metadata context with 64-bit status.

Offered with ``--next-data``.  Its extents are those of ``base:allocation``;
its status is 0 for data (``NBD_STATE_HOLE`` clear) and, for a hole, the
byte offset at which data next begins (the export size when no data
follows).  A client copying a sparse image learns from one reply how far it
may skip, where ``base:allocation`` says only that the requested range is
a hole; and on an export larger than 4 GiB the status needs more than 32
bits, which makes the context a worked example of the EXTENDED_HEADERS
extension's 64-bit status.

"Metadata querying": the ``x-*`` namespaces are for local experiments, and
"some metadata contexts have associated data that is 64 bits in length;
using such contexts requires the client to first negotiate extended
headers".  So it is served only with extended headers, in
NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunks (meta_contexts.py decides what
SET_META_CONTEXT and LIST_META_CONTEXT do without them).

Pure functions: the dispatch layer asks storage where data next begins
after the extents (:func:`lookahead`), then :func:`statuses` computes.
"""

from __future__ import annotations

from collections.abc import Sequence

from .constants import StateFlag

#: The context's name: a namespace of this server's own, then the leaf.
NAME = "x-reference:next-data"

_HOLE = StateFlag.HOLE.value


def lookahead(offset: int, lengths_flags: Sequence[tuple[int, int]], size: int) -> int | None:
    """Where storage must be asked for the next data, or None if the extents tell.

    ``lengths_flags`` are base:allocation's (length, flags) from ``offset``.
    Only a trailing hole that stops short of the export's end needs storage:
    its data lies beyond what was asked.
    """
    if not lengths_flags or not lengths_flags[-1][1] & _HOLE:
        return None
    end = offset + sum(length for length, _ in lengths_flags)
    return end if end < size else None


def statuses(
    offset: int, lengths_flags: Sequence[tuple[int, int]], size: int, data_after: int | None
) -> list[int]:
    """The status of each extent: 0 for data, for a hole the offset where data next begins.

    ``data_after`` is where data begins at or after the end of the extents
    (what storage answered for :func:`lookahead`); None means the export's
    end, where no data follows.
    """
    end = offset + sum(length for length, _ in lengths_flags)
    position = end
    next_data = size if data_after is None else data_after
    out = [0] * len(lengths_flags)
    # Backwards: a hole's next data is the start of the nearest data extent after it.
    for i in range(len(lengths_flags) - 1, -1, -1):
        length, flags = lengths_flags[i]
        position -= length
        if flags & _HOLE:
            out[i] = next_data
        else:
            next_data = position
    return out
