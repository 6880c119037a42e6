"""The metadata contexts an export offers, and which of them a query lists or selects.

Spec: "Metadata querying" (names are namespace, colon, leaf-name; the
``base:`` namespace), "NBD_OPT_LIST_META_CONTEXT" and
"NBD_OPT_SET_META_CONTEXT", and the EXTENDED_HEADERS extension's rules for
contexts whose status needs 64 bits.

Two contexts exist: ``base:allocation`` on every export, and
``x-reference:next-data`` (next_data.py) where ``--next-data`` offers it.
The handshake (handshake.py) frames the replies; this module only decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from . import next_data
from .constants import BASE_ALLOCATION
from .export import ExportInfo


@dataclass(frozen=True, slots=True)
class MetaContext:
    """A context this server can serve: its name, its ID, and whether its status needs 64 bits."""

    name: str
    # "NBD_OPT_SET_META_CONTEXT": IDs are transient and opaque to the client;
    # this server gives each context the same one every time.
    context_id: int
    # A status wider than 32 bits: served only with extended headers.
    wide: bool = False

    @property
    def namespace(self) -> bytes:
        """The name up to and including its colon, as a query names it."""
        return self.name.encode().partition(b":")[0] + b":"


BASE_ALLOCATION_CONTEXT = MetaContext(BASE_ALLOCATION, 1)
NEXT_DATA_CONTEXT = MetaContext(next_data.NAME, 2, wide=True)


def offered(export: ExportInfo) -> tuple[MetaContext, ...]:
    """The contexts a client may select on EXPORT."""
    if export.next_data:
        return (BASE_ALLOCATION_CONTEXT, NEXT_DATA_CONTEXT)
    return (BASE_ALLOCATION_CONTEXT,)


def listed(contexts: Sequence[MetaContext], queries: Sequence[bytes]) -> list[MetaContext]:
    """What NBD_OPT_LIST_META_CONTEXT returns for QUERIES.

    No query lists everything; a bare namespace (``base:``, ``x-reference:``)
    is a wildcard for its contexts ("the empty leaf-name makes sense as a
    wildcard for a client query during NBD_OPT_LIST_META_CONTEXT").
    """
    if not queries:
        return list(contexts)
    return [c for c in contexts if any(q in (c.namespace, c.name.encode()) for q in queries)]


def selected(contexts: Sequence[MetaContext], queries: Sequence[bytes]) -> list[MetaContext]:
    """What NBD_OPT_SET_META_CONTEXT selects for QUERIES: exact names only.

    A bare namespace "SHOULD NOT select any contexts", and ``base:`` alone
    MUST be ignored; unknown namespaces and leaves are ignored too.
    """
    return [c for c in contexts if c.name.encode() in queries]


@dataclass(frozen=True, slots=True)
class Answer:
    """What the server says to one LIST or SET_META_CONTEXT."""

    # The contexts named in NBD_REP_META_CONTEXT replies.
    named: list[MetaContext]
    # Contexts with 64-bit status asked for without extended headers (names,
    # comma-separated; "" when none): SET omits them, LIST names them and then
    # concludes with NBD_REP_ERR_EXT_HEADER_REQD.
    held_back: str


def answer(export: ExportInfo, queries: Sequence[bytes], setting: bool, extended: bool) -> Answer:
    """The answer to NBD_OPT_SET_META_CONTEXT (SETTING) or NBD_OPT_LIST_META_CONTEXT.

    EXTENDED_HEADERS extension: "If a client requests a metadata context that
    utilizes 64-bit status, but has not yet negotiated extended headers, the
    server MUST either omit that context from its successful reply, or else
    fail the request with NBD_REP_ERR_EXT_HEADER_REQD."  This server omits
    it: SET replaces every context even when it fails, so failing would cost
    the client base:allocation too, and LIST already told it why.  LIST "MAY
    advertise such contexts ... although it SHOULD then conclude the overall
    response with the NBD_REP_ERR_EXT_HEADER_REQD error".
    """
    contexts = offered(export)
    chosen = selected(contexts, queries) if setting else listed(contexts, queries)
    wide = [c for c in chosen if c.wide and not extended]
    named = [c for c in chosen if c not in wide] if setting else chosen
    return Answer(named, ", ".join(c.name for c in wide))
