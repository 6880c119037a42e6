"""Write payloads received straight into the store, on the running server.

``python -m reference_server`` receives an accepted NBD_CMD_WRITE's payload
into the store itself (``Backend.write_view``): the memory backend's mapping,
or a shared mapping of a file on tmpfs.  These tests drive it over a raw Unix
socket with the conformance suite's wire client, on both backings and both
event loops, and check what a client can see: pipelined writes and reads on
one connection, payloads split across many sends or sent with their header,
a client that vanishes mid-payload (the part that arrived stays, by design:
the write never completed, so nothing was promised about its range), a
rejected write whose payload is skipped, and a read-only export.  Every
server is stopped by PID when its test ends.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conformance.servers.peers import ServeOptions, reference_argv
from conformance.servers.process import ServerProcess, with_pythonpath
from conformance.wire import Cmd, WireClient
from conformance.wire.constants import Errno
from conformance.wire.messages import pack_request
from tests.processes import wait_until

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 10.0
SIZE = 4 << 20
BACKINGS = ["memory", "tmpfs-file"]
LOOPS = ["asyncio", "uvloop"]


@dataclass
class Server:
    process: ServerProcess
    sock: Path
    log: Path
    image: Path | None  # the served file, for the tmpfs backing

    def open_socket(self, timeout: float = 5.0) -> socket.socket:
        """A raw connection (what the suite's WireClient.connect expects)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(self.sock))
        return sock

    def client(self) -> WireClient:
        """A raw-wire client in transmission, after a well-behaved NBD_OPT_GO."""
        client = WireClient.connect(self, timeout=DEADLINE)
        client.open_export(b"")
        return client

    def file_bytes(self, offset: int, length: int) -> bytes:
        assert self.image is not None
        with open(self.image, "rb") as f:
            f.seek(offset)
            return f.read(length)


def _loop_available(loop: str) -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", f"import {loop}"], capture_output=True, timeout=DEADLINE, check=False
    )
    return probe.returncode == 0


@pytest.fixture
def launch() -> Iterator[Callable[..., Server]]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be too deep.
    workdir = Path(tempfile.mkdtemp(prefix="nbd-in-place-"))
    started: list[Server] = []

    def _launch(backing: str, loop: str = "asyncio", *args: str, fill: bytes = b"") -> Server:
        if loop != "asyncio" and not _loop_available(loop):
            pytest.skip(f"{loop} is not installed (the 'fast' extra installs it)")
        name = f"s{len(started)}"
        image = None
        if backing == "memory":
            target = ["--memory", str(SIZE)]
        else:
            if not Path("/dev/shm").is_dir():
                pytest.skip("no /dev/shm (tmpfs) here")
            image = Path("/dev/shm") / f"test-in-place-{os.getpid()}-{name}.raw"
            with open(image, "wb") as f:
                f.write(fill)
                f.truncate(SIZE)
            target = [str(image)]
        sock, log = workdir / f"{name}.sock", workdir / f"{name}.log"
        process = ServerProcess(
            reference_argv(
                ServeOptions(
                    socket=sock, extra=("-t", "-e", "0", "--event-loop", loop, *args, *target)
                )
            ),
            log_path=log,
            env=with_pythonpath(REPO),
            cwd=REPO,
        )
        server = Server(process, sock, log, image)
        started.append(server)
        process.wait_listening(sock, DEADLINE)
        return server

    try:
        yield _launch
    finally:
        for server in started:
            server.process.stop()
        for server in started:
            if server.image is not None:
                server.image.unlink(missing_ok=True)
        logs = [s.log.read_text(errors="replace") for s in started if s.log.exists()]
        shutil.rmtree(workdir, ignore_errors=True)
    for text in logs:
        assert "Traceback" not in text, text


def read_back(client: WireClient, offset: int, length: int) -> bytes:
    reply = client.read(offset, length)
    assert reply.error == Errno.OK, f"read of {length} at {offset}: {reply.error.name}"
    return reply.data(offset, length)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("backing", BACKINGS)
def test_pipelined_writes_and_reads_on_one_connection(
    launch: Callable[..., Server], backing: str, loop: str
) -> None:
    server = launch(backing, loop)
    client = server.client()
    first, second = b"\x11" * 65536, b"\x22" * 65536
    big = bytes(i % 253 for i in range(256 * 1024))
    # All sent before any reply is read: W1 R1 W2 R2 (each payload in one
    # send with its header), then W3 whose payload trickles in 1000-byte
    # sends, then R3.
    w1 = client.send_request(Cmd.WRITE, 4096, len(first), payload=first)
    r1 = client.send_request(Cmd.READ, 4096, 65536)
    w2 = client.send_request(Cmd.WRITE, 4096, len(second), payload=second)
    r2 = client.send_request(Cmd.READ, 4096, 65536)
    w3 = pack_request(Cmd.WRITE, SIZE - len(big), len(big), cookie=100, payload=big)
    for start in range(0, len(w3), 1000):
        client.send(w3[start : start + 1000])
    r3 = client.send_request(Cmd.READ, SIZE - len(big), len(big))
    replies = {cookie: client.reply(cookie) for cookie in (w1, r1, w2, r2, 100, r3)}
    assert all(r.error == Errno.OK for r in replies.values()), {
        c: r.error.name for c, r in replies.items()
    }
    seen1, seen2 = replies[r1].data(4096, 65536), replies[r2].data(4096, 65536)
    # R1 was parsed after W1 and before W2: it shows W1, or (its reply still
    # unsent when W2's payload landed) W2's bytes, "The server MAY process
    # commands out of order"; never anything else.
    assert set(seen1) <= {0x11, 0x22}, f"R1 shows bytes of neither write: {set(seen1)}"
    assert seen2 == second, "a read issued after a write completed must show it"
    assert replies[r3].data(SIZE - len(big), len(big)) == big
    assert read_back(client, 0, 4096) == bytes(4096), "a write spilled before its range"
    if server.image is not None:
        assert server.file_bytes(4096, 65536) == second
        assert server.file_bytes(SIZE - len(big), len(big)) == big
    client.disconnect()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("backing", BACKINGS)
def test_a_client_gone_mid_payload_leaves_its_prefix_and_the_server_serves_on(
    launch: Callable[..., Server], backing: str, loop: str
) -> None:
    server = launch(backing, loop)
    good = server.client()
    assert good.write(0, b"\x33" * 65536).error == Errno.OK
    offset, sent = 1 << 20, 10000
    gone = server.client()
    gone.send(pack_request(Cmd.WRITE, offset, 65536, cookie=1) + b"\xee" * sent)
    gone.close()  # an orderly close: every byte sent is read before the end of file
    # Served on the same connection and on a new one; the store is intact
    # around the cut write, and what arrived of it landed.
    fresh = server.client()
    assert read_back(fresh, 0, 65536) == b"\x33" * 65536
    # The server reads the cut connection's bytes on its own schedule; once
    # they are all in, exactly what was sent stands, then zeroes.
    prefix = b"\xee" * sent + bytes(65536 - sent)
    wait_until(lambda: read_back(fresh, offset, 65536) == prefix, "the prefix that arrived")
    assert read_back(good, offset - 4096, 4096) == bytes(4096)
    assert good.write(offset, b"\x44" * 65536).error == Errno.OK
    assert read_back(fresh, offset, 65536) == b"\x44" * 65536
    if server.image is not None:
        assert server.file_bytes(0, 65536) == b"\x33" * 65536
    good.disconnect()
    fresh.disconnect()
    assert server.process.process.poll() is None


@pytest.mark.parametrize("backing", BACKINGS)
def test_a_rejected_write_payload_is_skipped_and_never_lands(
    launch: Callable[..., Server], backing: str
) -> None:
    server = launch(backing)
    client = server.client()
    # 64 KiB straddling the end: ENOSPC, its payload read (in pieces) and dropped.
    offset = SIZE - 4096
    request = pack_request(Cmd.WRITE, offset, 65536, cookie=7) + b"\xee" * 65536
    for start in range(0, len(request), 5000):
        client.send(request[start : start + 5000])
    reply = client.reply(7)
    assert reply.error == Errno.ENOSPC, reply.error.name
    assert read_back(client, offset, 4096) == bytes(4096), "a rejected write landed"
    assert client.write(0, b"ok").error == Errno.OK, "the payload was not skipped exactly"
    assert read_back(client, 0, 2) == b"ok"
    if server.image is not None:
        assert server.file_bytes(offset, 4096) == bytes(4096)
    client.disconnect()


@pytest.mark.parametrize("backing", BACKINGS)
def test_a_write_on_a_read_only_export_is_eperm_and_changes_nothing(
    launch: Callable[..., Server], backing: str
) -> None:
    fill = b"\x5a" * 8192
    server = launch(backing, "asyncio", "-r", fill=fill)
    client = server.client()
    before = read_back(client, 0, 8192)
    client.send(pack_request(Cmd.WRITE, 0, 8192, cookie=3, payload=b"\xee" * 8192))
    assert client.reply(3).error == Errno.EPERM
    assert read_back(client, 0, 8192) == before
    if server.image is not None:
        assert server.file_bytes(0, 8192) == fill
    client.disconnect()
