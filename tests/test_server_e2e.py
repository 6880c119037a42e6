"""End-to-end tests of ``python -m reference_server`` as a process.

Each test starts the server (and, for comparisons, qemu-nbd 7.2 with the same
options on the same raw file) on a Unix socket in tmp_path, talks to it with
libnbd, and stops every process it started by PID when it ends.  What is
checked: NBD_FLAG_CAN_MULTI_CONN and the real connection limit for each of
``-r``, ``-r -e 2``, ``-e 2``, ``-e 0``, ``-e 1`` and no option against
qemu-nbd; one-shot exit after the last client; ``--persistent``; ``--fork``
with ``--pid-file``; SIGTERM with a client connected; ``--trace``; and bad
command lines.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nbd  # libnbd's bindings, from Debian's python3-libnbd
import pytest

from conformance.servers.peers import REPO_ROOT as REPO
from conformance.servers.peers import ServeOptions, qemu_nbd_argv, reference_argv
from conformance.servers.process import ServerProcess, stop_pid, with_pythonpath
from tests.processes import wait_until

PROG = "nbd-reference-server"
DEADLINE = 10.0
# How long a client beyond the connection limit is given to be served: qemu-nbd
# leaves it waiting in the listen backlog rather than refusing it.
NOT_SERVED_WITHIN = 1.5
DISK_SIZE = 1 << 20
ENV = with_pythonpath(REPO)


@dataclass
class Server:
    kind: str
    sock: Path
    log: Path
    process: ServerProcess | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.process is not None, "a server this test did not start"
        return self.process.process

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def ours_command(sock: Path, *args: str) -> list[str]:
    """The reference server on SOCK with ARGS, the command line under test."""
    return reference_argv(ServeOptions(socket=sock, extra=args))


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def _launch(kind: str, *args: str, name: str = "") -> Server:
        name = name or f"{kind}{len(started)}"
        sock = tmp_path / f"{name}.sock"
        log = tmp_path / f"{name}.log"
        if kind == "ours":
            cmd = ours_command(sock, *args)
        else:
            if shutil.which("qemu-nbd") is None:
                pytest.skip("qemu-nbd is not installed")
            cmd = qemu_nbd_argv(ServeOptions(socket=sock, extra=args))
        process = ServerProcess(cmd, log_path=log, env=ENV, cwd=REPO)
        server = Server(kind, sock, log, process)
        started.append(server)
        process.wait_listening(sock, DEADLINE)
        return server

    yield _launch
    for server in started:
        assert server.process is not None
        server.process.stop()
    for server in started:
        if server.kind == "ours":
            assert "Traceback" not in server.stderr(), server.stderr()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
    return path


def connect(server: Server) -> nbd.NBD:
    """A connected libnbd handle; retries while the listener is not accepting yet."""
    end = time.monotonic() + DEADLINE
    while True:
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        try:
            h.connect_unix(str(server.sock))
            return h
        except nbd.Error as exc:
            del h  # libnbd 1.14 closes a handle when it is freed
            # qemu-nbd binds its socket before it listens: retry until it does.
            # (libnbd's Error.errno is the symbolic name, e.g. "ECONNREFUSED".)
            if exc.errno not in ("ECONNREFUSED", "ENOENT"):
                raise
            if time.monotonic() > end:
                raise
            time.sleep(0.02)  # polling a condition, bounded by the deadline above


def advertised(h: nbd.NBD) -> dict[str, bool]:
    """What libnbd reports about the export: the transmission flags, by name."""
    names = ("multi_conn", "flush", "fua", "trim", "zero", "fast_zero", "df", "cache")
    flags = {name: bool(getattr(h, f"can_{name}")()) for name in names}
    flags["read_only"] = bool(h.is_read_only())
    flags["base:allocation"] = bool(h.can_meta_context("base:allocation"))
    return flags


def extra_client(server: Server, first: float, last: float) -> tuple[str, str]:
    """Connect without blocking; its state after ``first`` s and after at most ``last`` s.

    A state is 'served', 'refused' (an error reached libnbd) or 'waiting'.
    """
    h = nbd.NBD()
    start = time.monotonic()
    early = ""
    state = "waiting"
    try:
        h.aio_connect_unix(str(server.sock))
        while time.monotonic() - start < last:
            if h.aio_is_ready():
                state = "served"
            elif h.aio_is_dead() or h.aio_is_closed():
                state = "refused"
            if not early and (state != "waiting" or time.monotonic() - start >= first):
                early = state
            if state != "waiting":
                break
            h.poll(50)
    except nbd.Error:
        state = "refused"
    return early or state, state


# ------------------------------------------------ multi-conn vs qemu-nbd 7.2

CONFIGS = [
    pytest.param(["-r"], 1, id="r"),
    pytest.param(["-r", "-e", "2"], 2, id="r-e2"),
    pytest.param(["-e", "2"], 2, id="e2"),
    pytest.param(["-e", "0"], 0, id="e0"),
    pytest.param(["-e", "1"], 1, id="e1"),
    pytest.param([], 1, id="default"),
]


def observe(server: Server, limit: int) -> tuple[dict[str, bool], list[str]]:
    """The advertised flags, and how clients beyond the first are treated."""
    first = connect(server)
    clients = [first]
    try:
        flags = advertised(first)
        states = []
        extra = limit - 1 if limit else 3
        for _ in range(extra):
            clients.append(connect(server))
            states.append("served")
        if limit:
            # qemu-nbd leaves it in the listen backlog; ours holds it ungreeted
            # a moment for a slot, then refuses it with NBD_REP_ERR_POLICY.
            last = DEADLINE if server.kind == "ours" else NOT_SERVED_WITHIN
            early, final = extra_client(server, NOT_SERVED_WITHIN, last)
            states.append(early)
            if server.kind == "ours":
                states.append(f"finally {final}")
        # The connected clients are unaffected by a refused one.
        for h in clients:
            assert h.pread(512, 0) == bytes(512)
        if limit > 1:
            # A client leaving frees its slot for a newcomer.
            clients.pop().shutdown()
            clients.append(connect(server))
            states.append("served after a client left")
        return flags, states
    finally:
        for h in clients:
            h.shutdown()
        clients.clear()


@pytest.mark.parametrize(("options", "limit"), CONFIGS)
def test_multi_conn_and_connection_limit_match_qemu_nbd(
    options: list[str], limit: int, launch: Callable[..., Server], disk: Path
) -> None:
    ours = launch("ours", *options, str(disk))
    qemu = launch("qemu", *options, str(disk))
    # Both are observed at once: each spends most of its time waiting.
    with ThreadPoolExecutor(2) as pool:
        our_future = pool.submit(observe, ours, limit)
        qemu_flags, qemu_states = pool.submit(observe, qemu, limit).result(timeout=60)
        our_flags, our_states = our_future.result(timeout=60)
    # Without --persistent both exit on their own once the last client has left.
    assert qemu.proc.wait(timeout=DEADLINE) == 0, qemu.stderr()
    assert ours.proc.wait(timeout=DEADLINE) == 0, ours.stderr()
    assert our_flags == qemu_flags, f"qemu-nbd advertises {qemu_flags}, we advertise {our_flags}"
    # MULTI_CONN exactly when more than one client may connect (qemu >= 7.1).
    assert our_flags["multi_conn"] == (limit != 1)
    comparable = [s for s in our_states if not s.startswith("finally")]
    served = [s == "served" for s in comparable]
    assert served == [s == "served" for s in qemu_states], (our_states, qemu_states)
    if limit:
        # Beyond the limit neither serves the client; we also tell it so, cleanly.
        assert qemu_states[limit - 1] != "served", qemu_states
        assert our_states[limit - 1] != "served", our_states
        assert our_states[limit] == "finally refused", our_states


# ------------------------------------------------------------- lifecycle


def test_one_shot_server_exits_after_its_last_client(launch: Callable[..., Server]) -> None:
    server = launch("ours", "--memory", "1M")
    h = connect(server)
    h.pwrite(b"hello", 0)
    assert server.proc.poll() is None, "exited while a client was connected"
    h.shutdown()
    del h
    assert server.proc.wait(timeout=DEADLINE) == 0, server.stderr()
    assert not server.sock.exists(), "socket left behind"


def test_persistent_server_outlives_its_clients(launch: Callable[..., Server]) -> None:
    server = launch("ours", "--persistent", "--memory", "1M")
    for i in range(3):
        h = connect(server)  # the third connection proves the second did not end it
        h.pwrite(bytes([i + 1]) * 4, 0)
        assert h.pread(4, 0) == bytes([i + 1]) * 4
        h.shutdown()
        del h
    assert server.proc.poll() is None
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=DEADLINE) == 0, server.stderr()


def test_sigterm_with_a_connected_client_exits_cleanly_with_writes_on_disk(
    launch: Callable[..., Server], disk: Path
) -> None:
    server = launch("ours", str(disk))
    h = connect(server)
    pattern = bytes(range(256)) * 64
    h.pwrite(pattern, 4096)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=DEADLINE) == 0, server.stderr()
    with pytest.raises(nbd.Error):
        h.pread(512, 0)
    del h
    with open(disk, "rb") as f:
        f.seek(4096)
        assert f.read(len(pattern)) == pattern, "an acknowledged write was lost"
    assert not server.sock.exists()


def test_disc_after_pipelined_writes_completes_them_all(
    launch: Callable[..., Server], disk: Path
) -> None:
    # NBD_CMD_DISC: "The server MUST handle all outstanding requests".
    server = launch("ours", "--persistent", str(disk))
    h = connect(server)
    blocks = [bytes([i + 1]) * 65536 for i in range(16)]
    for i, block in enumerate(blocks):
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(block)), i * 65536)
    h.shutdown()  # sends NBD_CMD_DISC behind the writes without waiting for them
    del h
    h = connect(server)
    for i, block in enumerate(blocks):
        assert h.pread(65536, i * 65536) == block, f"write {i} lost at disconnect"
    h.shutdown()


def test_fork_with_pid_file(tmp_path: Path) -> None:
    sock = tmp_path / "fork.sock"
    pid_file = tmp_path / "server.pid"
    cmd = reference_argv(
        ServeOptions(socket=sock, memory="1M", persistent=True, fork=True, pid_file=pid_file)
    )
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, timeout=30, check=False)
    pid = int(pid_file.read_text()) if pid_file.exists() else 0
    try:
        assert done.returncode == 0, done.stderr.decode()
        # --fork returns only once the server listens.
        assert sock.exists(), "socket missing when --fork returned"
        assert pid > 1, "no PID in the pid file"
        os.kill(pid, 0)  # the daemon runs
        h = connect(Server("ours", sock, tmp_path / "none"))
        h.pwrite(b"forked", 0)
        assert h.pread(6, 0) == b"forked"
        h.shutdown()
        del h
    finally:
        if pid > 1:
            assert stop_pid(pid, DEADLINE) != signal.SIGKILL, "the daemon ignored SIGTERM"
    assert not pid_file.exists(), "pid file left behind"
    assert not sock.exists(), "socket left behind"


def test_trace_file_shows_the_session(launch: Callable[..., Server], tmp_path: Path) -> None:
    trace = tmp_path / "trace.log"
    server = launch("ours", f"--trace={trace}", "--memory", "1M")
    h = connect(server)
    h.pread(512, 0)
    h.shutdown()
    del h
    assert server.proc.wait(timeout=DEADLINE) == 0
    text = trace.read_text()
    for needle in (
        "S> greeting",
        "C> option NBD_OPT_GO",
        "S> option reply NBD_OPT_GO NBD_REP_ACK",
        "C> request NBD_CMD_READ",
        "C> request NBD_CMD_DISC",
    ):
        assert needle in text, f"{needle!r} missing from the trace:\n{text}"


# ------------------------------------------------------- bad command lines


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--no-such-option", "--memory", "1M"], id="unknown-option"),
        pytest.param(["-f", "qcow2", "{disk}"], id="format-qcow2"),
        pytest.param(["{tmp}/missing.raw"], id="missing-file"),
        pytest.param(["{disk}", "--memory", "1M"], id="file-and-memory"),
    ],
)
def test_bad_command_line_exits_nonzero_with_a_short_message(
    args: list[str], tmp_path: Path, disk: Path
) -> None:
    argv = [a.format(disk=disk, tmp=tmp_path) for a in args]
    sock = tmp_path / "never.sock"
    done = subprocess.run(
        ours_command(sock, *argv),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        timeout=30,
        check=False,
    )
    err = done.stderr.decode()
    assert done.returncode != 0
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert lines and lines[0].startswith(f"{PROG}: "), err
    assert len(lines) <= 2, f"expected a one-line message (plus a --help hint):\n{err}"
    assert done.stdout == b""
    assert not sock.exists()


def test_tls_verify_peer_requires_a_client_certificate(
    launch: Callable[..., Server], tmp_path: Path
) -> None:
    """--tls-verify-peer: a client without a certificate signed by the CA is not served."""
    from conformance import tlsutil  # the suite's generator; tests may share it

    creds = tlsutil.generate(tmp_path / "creds").directory
    ca_only = tmp_path / "ca-only"
    ca_only.mkdir()
    shutil.copy(creds / "ca-cert.pem", ca_only / "ca-cert.pem")
    server = launch("ours", "-t", f"--tls-creds={creds}", "--tls-verify-peer", "--memory", "1M")
    wait_until(server.sock.exists, "the TLS server to listen")

    def nbdinfo_size(certificates: Path) -> subprocess.CompletedProcess[str]:
        uri = f"nbds+unix:///?socket={server.sock}&tls-certificates={certificates}"
        return subprocess.run(
            ["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30, check=False
        )

    refused = nbdinfo_size(ca_only)
    assert refused.returncode != 0, "served a client that presented no certificate"
    served = nbdinfo_size(creds)
    assert served.returncode == 0, served.stderr
    assert served.stdout.strip() == str(1 << 20)
    assert server.proc.poll() is None, "the server died on the refused handshake"


def _loop_available(loop: str) -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", f"import {loop}"], capture_output=True, timeout=DEADLINE, check=False
    )
    return probe.returncode == 0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("backing", ["memory", "tmpfs-file", "disk-file"])
def test_every_event_loop_serves_pipelined_mixed_sizes_intact(
    launch: Callable[..., Server], tmp_path: Path, loop: str, backing: str
) -> None:
    # The same bytes whichever loop runs the server and whichever path a
    # request takes (inline, the thread pool, or run now from memory).
    if loop != "asyncio" and not _loop_available(loop):
        pytest.skip(f"{loop} is not installed (the 'fast' extra installs it)")
    size = 8 << 20
    image: Path | None = None
    if backing == "memory":
        target = ["--memory", str(size)]
    else:
        if backing == "disk-file":
            image = tmp_path / "disk.raw"
        elif Path("/dev/shm").is_dir():
            image = Path("/dev/shm") / f"test-e2e-{os.getpid()}-{loop}.raw"
        else:
            pytest.skip("no /dev/shm (tmpfs) here")
        with open(image, "wb") as f:
            f.truncate(size)
        target = [str(image)]
    try:
        server = launch("ours", "--event-loop", loop, *target)
        h = connect(server)
        sizes = [4096, 65536, 1 << 20, 512, 131072]
        writes = []
        offset = 0
        for i, size in enumerate(sizes):
            data = bytes([(i * 37 + j) % 251 for j in range(251)]) * (size // 251 + 1)
            writes.append((offset, data[:size]))
            offset += size + 4096
        for off, data in writes:
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        h.flush()
        reads = [(off, nbd.Buffer(len(data))) for off, data in writes]
        for off, buf in reads:
            h.aio_pread(buf, off)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for (off, data), (_, buf) in zip(writes, reads, strict=True):
            assert buf.to_bytearray() == data, f"{len(data)} bytes at {off} read back wrong"
        h.shutdown()
    finally:
        if image is not None:
            image.unlink(missing_ok=True)
