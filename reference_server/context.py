"""What a connection is given to work with, instead of the whole server.

The server (server.py) builds one :class:`ConnectionContext` and hands it to
every :class:`~.connection.Connection`; a connection never sees the server,
so connection.py does not import server.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .admission import Admission
from .backends.base import Backend
from .budget import ByteBudget
from .gate import AdmissionGate, Admittee
from .protocol.export import ExportInfo
from .protocol.handshake import HandshakeLimits
from .trace import TraceLog

RECEIVE_BUFFER = 256 * 1024


@dataclass
class ServerLimits:
    """Resource limits that keep one client from starving the others."""

    # Seconds a client may take to finish option haggling (CVE-2024-7409); 0 = none.
    handshake_timeout: float = 10.0
    # Seconds a negotiating client may take to answer each server message
    # (the greeting, an option reply, the TLS handshake); 0 = none.
    handshake_progress_timeout: float = 5.0
    # Seconds a client beyond the connection limit waits for a free slot
    # (ungreeted) before it is refused with NBD_REP_ERR_POLICY.
    slot_wait: float = 2.0
    # Clients in option haggling at once; at the cap the server accepts no more
    # (newcomers wait in the listen backlog) until a negotiation ends.
    max_handshaking: int = 64
    # Requests in flight per connection before it stops reading.
    max_inflight_requests: int = 64
    # Request and reply bytes held in memory, server-wide (see budget.py).
    max_inflight_bytes: int = 64 * 1024 * 1024
    handshake: HandshakeLimits = field(default_factory=HandshakeLimits)

    def admission(self, *, shared: int, persistent: bool) -> Admission[Admittee]:
        """The admission rules these limits set (``-e/--shared``, ``--persistent``)."""
        return Admission(
            shared=shared,
            persistent=persistent,
            max_handshaking=self.max_handshaking,
            handshake_timeout=self.handshake_timeout,
            progress_timeout=self.handshake_progress_timeout,
            slot_wait=self.slot_wait,
        )


@dataclass
class Export:
    """An export: what the protocol advertises and the storage behind it."""

    info: ExportInfo
    backend: Backend


class Tracked(Protocol):
    """What the server's shutdown needs of a connection."""

    idle: asyncio.Event

    def begin_shutdown(self) -> None: ...

    def close(self) -> None: ...


class OpenConnections:
    """The connections alive now, and an event set whenever there are none."""

    def __init__(self) -> None:
        self._open: dict[Tracked, None] = {}
        self.all_closed = asyncio.Event()
        self.all_closed.set()

    def add(self, connection: Tracked) -> None:
        self._open[connection] = None
        self.all_closed.clear()

    def discard(self, connection: Tracked) -> None:
        self._open.pop(connection, None)
        if not self._open:
            self.all_closed.set()

    def __iter__(self) -> Iterator[Tracked]:
        return iter(list(self._open))

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, connection: object) -> bool:
        return connection in self._open


@dataclass
class ConnectionContext:
    exports: Mapping[str, Export]
    limits: ServerLimits
    admission: AdmissionGate
    budget: ByteBudget
    executor: concurrent.futures.Executor
    connections: OpenConnections
    tls: ssl.SSLContext | None = None
    trace: TraceLog | None = None
    infos: Mapping[str, ExportInfo] = field(init=False)
    #: Where every connection receives headers and handshake bytes.  One
    #: buffer serves them all: asyncio calls get_buffer() and buffer_updated()
    #: back to back, and the protocol core copies what it keeps, so a
    #: connection costs no 256 KiB buffer of its own.
    receive_buffer: memoryview = field(init=False)

    def __post_init__(self) -> None:
        self.infos = {name: export.info for name, export in self.exports.items()}
        self.receive_buffer = memoryview(bytearray(RECEIVE_BUFFER))
