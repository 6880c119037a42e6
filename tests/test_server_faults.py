"""Fault tests of ``python -m reference_server`` as a process: it keeps serving, loses nothing.

Each test starts the server on a Unix socket in a temporary directory (with
PR_SET_PDEATHSIG, so a killed test run leaves no server behind), drives it with
libnbd and with the conformance suite's raw-wire client, and stops it by PID
when it ends.  Covered: crash consistency after ``kill -9`` (FUA, FLUSH), a
full disk (RLIMIT_FSIZE: EFBIG reported as NBD_ENOSPC), clients vanishing in
the middle of a write payload, a crowd of stalled clients against
``--max-handshaking`` and the progress deadline, ``--handshake-timeout``,
SIGTERM with writes in flight, and the connection limit (``-e 1``).
"""

from __future__ import annotations

import contextlib
import errno
import resource
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nbd  # libnbd's bindings, from Debian's python3-libnbd
import pytest

from conformance.servers.peers import ServeOptions, reference_argv
from conformance.servers.process import ServerProcess, with_pythonpath
from conformance.wire import Cmd, WireClient
from conformance.wire.messages import pack_request
from tests.processes import wait_until

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 10.0
BLOCK = 64 * 1024


@dataclass
class Server:
    """A reference server process the harness started (conformance/servers/process.py)."""

    process: ServerProcess
    sock: Path
    log: Path

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.process.process

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def open_socket(self, timeout: float = 5.0) -> socket.socket:
        """A raw connection (what the suite's WireClient.connect expects)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(self.sock))
        return sock


def _file_size_limit(fsize_limit: int) -> Callable[[], None]:
    def setup() -> None:
        # Python ignores SIGXFSZ, so writes past the limit fail with EFBIG.
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    return setup


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be too deep.
    path = Path(tempfile.mkdtemp(prefix="nbd-faults-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def launch(workdir: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def _launch(*args: str, fsize_limit: int | None = None) -> Server:
        name = f"s{len(started)}"
        sock, log = workdir / f"{name}.sock", workdir / f"{name}.log"
        process = ServerProcess(
            reference_argv(ServeOptions(socket=sock, extra=args)),
            log_path=log,
            env=with_pythonpath(REPO),
            cwd=REPO,
            child_setup=None if fsize_limit is None else _file_size_limit(fsize_limit),
        )
        server = Server(process, sock, log)
        started.append(server)
        process.wait_listening(sock, DEADLINE)
        return server

    yield _launch
    for server in started:
        server.process.stop()
    for server in started:
        assert "Traceback" not in server.stderr(), server.stderr()


@pytest.fixture
def disk(workdir: Path) -> Path:
    path = workdir / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    return path


def connect(server: Server, timeout: float = DEADLINE) -> nbd.NBD:
    """A libnbd handle, connected within TIMEOUT seconds (or an AssertionError)."""
    h = nbd.NBD()
    h.aio_connect_unix(str(server.sock))
    end = time.monotonic() + timeout
    try:
        while not h.aio_is_ready():
            if h.aio_is_dead() or h.aio_is_closed():
                raise AssertionError("the connection failed during the handshake")
            if time.monotonic() > end:
                raise AssertionError(f"not served within {timeout} s")
            h.poll(50)
    except nbd.Error as exc:
        raise AssertionError(f"not served: {exc}") from None
    return h


def outcome_of_connect(server: Server, timeout: float) -> tuple[str, float]:
    """('served' | 'refused' | 'waiting', seconds) for a new libnbd client."""
    h = nbd.NBD()
    start = time.monotonic()
    try:
        h.aio_connect_unix(str(server.sock))
        while time.monotonic() - start < timeout:
            if h.aio_is_ready():
                h.shutdown()
                return "served", time.monotonic() - start
            if h.aio_is_dead() or h.aio_is_closed():
                return "refused", time.monotonic() - start
            h.poll(50)
    except nbd.Error:
        return "refused", time.monotonic() - start
    return "waiting", time.monotonic() - start


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def block(tag: int, size: int = BLOCK) -> bytes:
    return struct.pack(">Q", tag) * (size // 8)


def raw_client(server: Server) -> WireClient:
    """The suite's raw-wire client, in transmission after a well-behaved NBD_OPT_GO."""
    client = WireClient.connect(server, timeout=5.0)
    client.open_export(b"")
    return client


# ------------------------------------------------------ crash consistency


def test_fua_and_flushed_writes_survive_kill_9(launch: Callable[..., Server], disk: Path) -> None:
    server = launch("-t", str(disk))
    h = connect(server)
    fua = block(1)
    h.pwrite(fua, 0, nbd.CMD_FLAG_FUA)
    flushed = [block(10 + i) for i in range(4)]
    for i, data in enumerate(flushed):
        h.pwrite(data, BLOCK * (1 + i))
    h.flush()
    server.proc.kill()
    assert server.proc.wait(timeout=DEADLINE) == -signal.SIGKILL
    assert file_bytes(disk, 0, BLOCK) == fua, "a write acknowledged with FUA was lost"
    for i, data in enumerate(flushed):
        got = file_bytes(disk, BLOCK * (1 + i), BLOCK)
        assert got == data, f"write {i}, acknowledged and then flushed, was lost"


# ------------------------------------------------------------- full disk


def test_full_disk_reports_enospc_and_keeps_serving(
    launch: Callable[..., Server], disk: Path
) -> None:
    limit = 1 << 20  # the 4 MiB sparse file may not grow past 1 MiB of offsets
    server = launch("-t", "-e", "2", str(disk), fsize_limit=limit)
    h = connect(server)
    early = block(7)
    h.pwrite(early, 0)
    with pytest.raises(nbd.Error) as failure:
        h.pwrite(block(8), 2 << 20)
    # "Error values": EFBIG (and EDQUOT) are reported as NBD_ENOSPC.
    assert failure.value.errnum == errno.ENOSPC, failure.value
    with pytest.raises(nbd.Error) as failure:
        h.pwrite(block(9), limit - BLOCK // 2)  # straddles the limit
    assert failure.value.errnum == errno.ENOSPC, failure.value
    # The same connection, and a new one, are still served; nothing else changed.
    assert h.pread(BLOCK, 0) == early
    h.pwrite(block(11), BLOCK, nbd.CMD_FLAG_FUA)
    other = connect(server)
    assert other.pread(BLOCK, 0) == early
    assert other.pread(BLOCK, BLOCK) == block(11)
    assert other.pread(BLOCK, 2 << 20) == bytes(BLOCK), "a failed write changed the disk"
    other.shutdown()
    h.shutdown()
    assert server.proc.poll() is None, server.stderr()


# ------------------------------------------------- clients that vanish


def test_clients_vanishing_mid_write_do_not_disturb_others(
    launch: Callable[..., Server],
) -> None:
    server = launch("-t", "-e", "0", "--memory", "4M")
    good = connect(server)
    good.pwrite(block(1), 0)
    for i in range(40):
        client = raw_client(server)
        length = BLOCK * (1 + i % 4)
        header = pack_request(Cmd.WRITE, BLOCK * 8, length, cookie=i)
        client.send(header + b"\xee" * (length // 2))  # half the payload, then gone
        if i % 2:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        # The other client is served all the while, and sees its own data.
        good.pwrite(block(100 + i, 4096), BLOCK + 4096 * (i % 8))
        assert good.pread(BLOCK, 0) == block(1)
    # A write cut off mid-payload leaves the part of it that arrived (the
    # payload is received into the store): here some run of 0xee from the
    # start, never more than the half that was sent, nothing beyond.
    cut = good.pread(BLOCK * 4, BLOCK * 8)
    landed = len(cut) - len(cut.lstrip(b"\xee"))
    assert landed <= BLOCK * 2, f"{landed} bytes landed; at most {BLOCK * 2} were sent"
    assert cut[landed:] == bytes(len(cut) - landed), "bytes that were never sent landed"
    fresh = connect(server)
    assert fresh.pread(BLOCK, 0) == block(1)
    fresh.shutdown()
    good.shutdown()
    assert server.proc.poll() is None, server.stderr()


def test_client_vanishing_during_a_large_read_reply_stops_the_writes(
    launch: Callable[..., Server],
) -> None:
    """A client that asks for 32 MiB and hangs up: the server stops sending at once.

    asyncio logs "socket.send() raised exception." for every write to a
    transport whose connection is lost (after the fifth); one such line per
    256 KiB slice means the server kept writing a reply nobody will read.
    """
    server = launch("-t", "-e", "0", "--memory", "64M")
    for _ in range(3):
        client = raw_client(server)
        client.send_request(Cmd.READ, 0, 32 << 20)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
    h = connect(server)  # served: the event loop has finished with the readers above
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()
    complaints = server.stderr().count("socket.send() raised exception")
    assert complaints == 0, (
        f"the server went on writing after its clients left: asyncio complained of "
        f"{complaints} writes to a lost connection:\n" + server.stderr()[-500:]
    )


# ---------------------------------------------- stalled clients, limits


def _stalled(server: Server, count: int) -> list[socket.socket]:
    """COUNT connections that read the greeting (when they get one) and then say nothing."""
    socks = []
    for _ in range(count):
        sock = server.open_socket(timeout=0.5)
        socks.append(sock)
        with contextlib.suppress(OSError):
            sock.recv(18)
    return socks


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def test_crowd_of_stalled_clients_does_not_lock_out_a_good_one(
    launch: Callable[..., Server],
) -> None:
    """Three times --max-handshaking stalled clients, then a good one.

    At the cap the server accepts nobody (the rest wait in the listen
    backlog); each stalled client is shed by its progress deadline, never
    because others arrived, and the good client is served once its turn
    comes.
    """
    server = launch(
        "-t", "-e", "0", "--max-handshaking", "16", "--handshake-progress-timeout", "1",
        "--memory", "1M",
    )  # fmt: skip
    crowd = [server.open_socket() for _ in range(48)]  # connected, and silent
    try:
        state, took = outcome_of_connect(server, timeout=30.0)
        assert state == "served", f"a well-behaved client was {state} after {took:.1f} s"
        closed = sum(_closed_by_server(sock, DEADLINE) for sock in crowd)
        assert closed == len(crowd), f"only {closed} of {len(crowd)} stalled clients were shed"
    finally:
        for sock in crowd:
            sock.close()


@pytest.mark.parametrize("stage", ["after-greeting", "mid-option"])
def test_handshake_timeout_closes_a_stalled_client(
    launch: Callable[..., Server], stage: str
) -> None:
    server = launch("-t", "-e", "0", "--handshake-timeout", "1", "--memory", "1M")
    sock = server.open_socket()
    try:
        start = time.monotonic()
        assert len(sock.recv(18)) == 18
        if stage == "mid-option":
            sock.sendall(struct.pack(">I", 1) + b"IHAVEOPT\0\0")
        assert _closed_by_server(sock, 5.0), "still open 5 s after a 1 s handshake timeout"
        took = time.monotonic() - start
        assert 0.8 <= took <= 3.0, f"closed after {took:.2f} s with --handshake-timeout 1"
    finally:
        sock.close()
    state, _ = outcome_of_connect(server, timeout=5.0)
    assert state == "served"


# ------------------------------------------------ SIGTERM mid-flight


def test_sigterm_with_writes_in_flight_keeps_every_acknowledged_write(
    launch: Callable[..., Server], disk: Path
) -> None:
    server = launch(str(disk))
    h = connect(server)
    count = 48
    cookies = [
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(block(i + 1))), i * BLOCK)
        for i in range(count)
    ]

    acknowledged: set[int] = set()
    failed: set[int] = set()

    def collect() -> bool:
        """Retire finished writes; True once every write has an outcome."""
        for i, cookie in enumerate(cookies):
            if i in acknowledged or i in failed:
                continue
            try:
                if h.aio_command_completed(cookie):
                    acknowledged.add(i)
            except nbd.Error:
                failed.add(i)
        return len(acknowledged) + len(failed) == count

    def first_acknowledged() -> bool:
        with contextlib.suppress(nbd.Error):
            h.poll(10)
        collect()
        return bool(acknowledged)

    wait_until(first_acknowledged, "the first write to be acknowledged")
    in_flight = count - len(acknowledged) - len(failed)
    server.proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + DEADLINE
    while not collect() and time.monotonic() < end:
        if h.aio_is_dead() or h.aio_is_closed():
            collect()
            break
        with contextlib.suppress(nbd.Error):
            h.poll(20)
    assert server.proc.wait(timeout=DEADLINE) == 0, server.stderr()
    assert in_flight > 0, "every write finished before SIGTERM: nothing was in flight"
    for i in sorted(acknowledged):
        assert file_bytes(disk, i * BLOCK, BLOCK) == block(i + 1), f"acknowledged write {i} lost"


# ------------------------------------------------------- connection limit


def test_connection_limit_refuses_cleanly_then_serves(launch: Callable[..., Server]) -> None:
    server = launch("-e", "1", "-t", "--memory", "1M")
    first = connect(server)
    first.pwrite(b"first", 0)
    # The server holds a second client up to 2 s for a slot, then refuses it.
    state, took = outcome_of_connect(server, timeout=6.0)
    assert state == "refused", f"a second client was {state} after {took:.1f} s"
    assert took < 5.0
    assert first.pread(5, 0) == b"first", "the first client was disturbed"
    # A client that arrives while the slot is taken is served once it frees up.
    waiting = nbd.NBD()
    waiting.aio_connect_unix(str(server.sock))
    with contextlib.suppress(nbd.Error):
        waiting.poll(100)
    assert not waiting.aio_is_ready()
    first.shutdown()

    def ready() -> bool:
        waiting.poll(50)
        return bool(waiting.aio_is_ready())

    took = wait_until(ready, "the waiting client to be served", deadline=5.0)
    assert waiting.pread(5, 0) == b"first"
    waiting.shutdown()
    assert took < 2.5, f"served {took:.1f} s after the slot freed up"
