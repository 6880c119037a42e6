"""Accepting connections only while admission has room for them.

asyncio's own server accepts whatever arrives.  This listener accepts while
:attr:`~.gate.AdmissionGate.has_room` holds and otherwise stops watching the
listening sockets, so newcomers wait in the kernel's listen backlog (as they
do at qemu-nbd's connection limit) instead of being accepted and then closed.
It also stops, for a moment, when the process runs out of file descriptors
or memory for a socket (EMFILE, ENFILE, ENOBUFS, ENOMEM), as asyncio does:
the connections stay queued and are accepted once something is freed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Iterable

from .gate import AdmissionGate

log = logging.getLogger("reference_server")

# Connections accepted per wake-up before the loop serves the others.
ACCEPT_BATCH = 64
# After EMFILE and the like: try again this soon, or as soon as a connection goes.
RESOURCE_RETRY = 1.0
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Listener:
    def __init__(
        self,
        sockets: Iterable[socket.socket],
        protocol_factory: Callable[[], asyncio.BufferedProtocol],
        gate: AdmissionGate,
    ) -> None:
        self._sockets = list(sockets)
        self._factory = protocol_factory
        self._gate = gate
        self._watching = False
        self._closed = False
        self._starting = 0  # accepted, connection_made not yet called
        self._retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        gate.on_room = self.resume

    def start(self) -> None:
        for sock in self._sockets:
            sock.setblocking(False)
        self.resume()

    def resume(self) -> None:
        """Watch the listening sockets again (when room frees up)."""
        if self._watching or self._closed or not self._room():
            return
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)
        self._watching = True

    def pause(self) -> None:
        """Leave newcomers in the listen backlog."""
        if not self._watching:
            return
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())
        self._watching = False

    def close(self) -> None:
        """Stop listening for good: queued connections are reset when the sockets close."""
        self.pause()
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for sock in self._sockets:
            sock.close()

    def _room(self) -> bool:
        gate = self._gate
        return gate.admission.has_room and (
            len(gate.admission.handshaking) + self._starting < gate.admission.max_handshaking
        )

    def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            if not self._room():
                self.pause()
                return
            try:
                sock, _ = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                log.warning("cannot accept a connection (%s); new clients wait", exc.strerror)
                self.pause()
                self._retry = loop.call_later(RESOURCE_RETRY, self._retry_now)
                return
            self._starting += 1
            task = loop.create_task(self._start(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _retry_now(self) -> None:
        self._retry = None
        self.resume()

    async def _start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock.setblocking(False)
            await loop.connect_accepted_socket(self._factory, sock)
        except OSError as exc:  # the client left before the transport was set up
            log.debug("accepted connection lost at once: %s", exc)
            sock.close()
        finally:
            self._starting -= 1
            self.resume()
