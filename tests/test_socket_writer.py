"""Replies written straight to the socket (socket_writer.py, and replies.py's direct road).

A real socket pair under a real event loop: the queue's parts (buffers,
memoryviews, regions of a file) must arrive whole and in order, however
little the socket takes at a time, with budget markers given back only once
what precedes them has left, and a peer that hangs up costs the connection,
not the server.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from reference_server.backends.base import FileRegion
from reference_server.budget import ByteBudget
from reference_server.replies import ReplyQueue
from reference_server.socket_writer import SocketWriter

DEADLINE = 10.0


class IdleTransport:
    """What the queue asks of a transport when the writer does the writing."""

    def __init__(self, buffered: int = 0) -> None:
        self.buffered = buffered
        self.aborted = False
        self.written = bytearray()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    def write(self, data: Any) -> None:
        self.written += data


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


async def drain_into(queue: ReplyQueue, transport: Any, peer: socket.socket, want: int) -> bytes:
    """Flush whenever the writer says the socket can take more; read the peer meanwhile."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    peer.setblocking(False)
    while len(got) < want:
        queue.flush(transport)
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(peer, 1 << 20), DEADLINE)
        except TimeoutError:
            break
        if not chunk:
            break
        got += chunk
    return bytes(got)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def pair() -> Any:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_parts_arrive_whole_and_in_order_with_partial_sends(pair: Any, tmp_path: Path) -> None:
    a, b = pair
    image = tmp_path / "image"
    file_data = pattern(3 << 20, 5)
    image.write_bytes(file_data)
    fd = os.open(image, os.O_RDONLY)

    async def main() -> None:
        budget = ByteBudget(1 << 30)
        budget.used = 300
        queue = ReplyQueue(budget)
        woken: list[int] = []

        def writable() -> None:
            woken.append(1)
            queue.flush(transport)

        writer = SocketWriter(a.fileno(), writable)
        queue.writer = writer
        # A small send buffer (after the writer asked for a large one): large
        # replies go out in many partial sends.
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        transport: Any = IdleTransport()
        big = bytearray(pattern(1 << 20, 1))
        parts: list[Any] = [b"head", memoryview(big), pattern(100, 2)]
        queue.add(parts, cost=100)
        queue.add([b"x" * 7, FileRegion(fd, 4096, 2 << 20), b"tail"], cost=200)
        want = 4 + len(big) + 100 + 7 + (2 << 20) + 4
        got = await drain_into(queue, transport, b, want)
        writer.close()
        assert (
            got
            == b"head"
            + big
            + pattern(100, 2)
            + b"x" * 7
            + file_data[4096 : 4096 + (2 << 20)]
            + b"tail"
        )
        assert queue.unsent == 0
        assert budget.used == 0, "every marker is given back once its reply has left"
        assert woken, "the socket filled up at least once: the writer waited for it"

    try:
        run(main())
    finally:
        os.close(fd)


def test_a_transport_with_bytes_of_its_own_keeps_the_order(pair: Any) -> None:
    a, _ = pair

    async def main() -> None:
        queue = ReplyQueue(ByteBudget(1 << 20))
        queue.writer = SocketWriter(a.fileno(), lambda: None)
        transport: Any = IdleTransport(buffered=10)  # the handshake's last reply, still queued
        queue.add([b"reply"])
        queue.flush(transport)
        assert transport.written == b"reply", "must go behind the transport's bytes"
        queue.writer.close()

    run(main())


def test_a_peer_that_hung_up_aborts_the_connection(pair: Any) -> None:
    a, b = pair
    b.close()

    async def main() -> None:
        budget = ByteBudget(1 << 20)
        budget.used = 50
        queue = ReplyQueue(budget)
        queue.writer = SocketWriter(a.fileno(), lambda: None)
        transport: Any = IdleTransport()
        queue.add([b"reply" * 1000], cost=50)
        queue.flush(transport)
        assert transport.aborted
        assert queue.unsent == 0 and budget.used == 0
        queue.writer.close()

    run(main())


def test_a_file_that_shrank_under_a_reply_aborts_the_connection(pair: Any, tmp_path: Path) -> None:
    a, _ = pair
    image = tmp_path / "image"
    image.write_bytes(b"short")
    fd = os.open(image, os.O_RDONLY)

    async def main() -> None:
        queue = ReplyQueue(ByteBudget(1 << 20))
        queue.writer = SocketWriter(a.fileno(), lambda: None)
        transport: Any = IdleTransport()
        queue.add([b"head", FileRegion(fd, 0, 4096)])
        queue.flush(transport)
        assert transport.aborted, "the header promised 4096 bytes the file no longer has"
        queue.writer.close()

    try:
        run(main())
    finally:
        os.close(fd)


def test_closing_the_writer_leaves_the_transports_descriptor_open(pair: Any) -> None:
    a, _ = pair

    async def main() -> None:
        SocketWriter(a.fileno(), lambda: None).close()

    run(main())
    a.send(b"still open")  # raises if our close had closed the transport's socket


class CountingWriter(SocketWriter):
    """A writer that counts its sendmsg calls."""

    calls = 0

    def send(self, parts: Any) -> int:
        self.calls += 1
        return super().send(parts)


def test_the_replies_of_a_pass_leave_in_one_sendmsg(pair: Any) -> None:
    """Budget markers between replies do not split the gather: 16 small replies, each with
    its marker, leave in one system call, and every marker comes back."""
    a, b = pair

    async def main() -> None:
        budget = ByteBudget(1 << 20)
        budget.used = 16 * 10
        queue = ReplyQueue(budget)
        writer = CountingWriter(a.fileno(), lambda: None)
        queue.writer = writer
        replies = [pattern(16 + n, n) for n in range(16)]
        for reply in replies:
            queue.add([reply[:16], reply[16:]], cost=10)
        transport: Any = IdleTransport()
        queue.flush(transport)
        writer.close()
        assert writer.calls == 1
        assert budget.used == 0 and queue.unsent == 0
        b.setblocking(False)
        assert b.recv(1 << 16) == b"".join(replies)

    run(main())


def test_markers_after_a_partial_send_wait_for_their_bytes(pair: Any) -> None:
    """A send that stops inside the second reply gives back the first reply's marker only."""
    a, _ = pair

    class Partial(SocketWriter):
        def send(self, parts: Any) -> int:
            return 150  # all of the first reply (100 bytes), half of the second

    async def main() -> None:
        budget = ByteBudget(1 << 20)
        budget.used = 30
        queue = ReplyQueue(budget)
        writer = Partial(a.fileno(), lambda: None)
        writer.wait_writable = lambda: None  # type: ignore[method-assign]
        queue.writer = writer
        queue.add([b"a" * 100], cost=10)
        queue.add([b"b" * 100], cost=20)
        transport: Any = IdleTransport()
        queue.flush(transport)
        writer.close()
        assert budget.used == 20, "the second reply's marker waits for its last 50 bytes"
        assert queue.unsent == 50

    run(main())
