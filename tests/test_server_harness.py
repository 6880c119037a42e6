"""The server harness: each peer's command line, and a server process's life.

The command lines are checked as data (what each option becomes, what a peer
refuses); the lifecycle against small Python children that stand in for a
server: one that listens late, one that dies before listening, one that
ignores SIGTERM, one that daemonises.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conformance.servers.peers import (
    PEERS,
    PeerCannotDo,
    ServeOptions,
    nbdkit_argv,
    qemu_nbd_argv,
    reference_argv,
)
from conformance.servers.process import (
    ServerProcess,
    ServerStartError,
    alive,
    descendants,
    end_process_tree,
    unix_socket_listening,
    wait_until,
)

# ------------------------------------------------------------ command lines


def test_reference_argv_spells_every_option_in_qemu_nbd_names() -> None:
    argv = reference_argv(
        ServeOptions(
            socket="s.sock",
            image="disk.raw",
            read_only=True,
            shared=2,
            persistent=True,
            export_name="",
            description="a disk",
            tls_dir="pki",
            minimum_block_size=512,
            fork=True,
            pid_file="pid",
            trace="t.log",
            extra=("-v",),
        ),
        python="py",
    )
    assert argv == [
        "py", "-m", "reference_server", "-x", "", "-D", "a disk", "--shared", "2",
        "--tls-creds", "pki", "-r", "-t", "--minimum-block-size=512", "--fork",
        "--pid-file", "pid", "-k", "s.sock", "--trace=t.log", "-v", "-f", "raw", "disk.raw",
    ]  # fmt: skip


def test_reference_argv_of_the_docs_keeps_the_order_the_reader_sees() -> None:
    argv = reference_argv(ServeOptions(socket="nbd.sock", memory="1M", shared=3), python="py")
    assert argv[3:] == ["--memory", "1M", "--shared", "3", "-k", "nbd.sock"]


def test_qemu_nbd_argv_carries_tuning_and_tls() -> None:
    argv = qemu_nbd_argv(
        ServeOptions(
            socket="s", image="img", shared=0, persistent=True, tls_dir="/pki",
            cache="writeback", aio="threads", discard="unmap",
        )
    )  # fmt: skip
    assert argv == [
        "qemu-nbd", "-f", "raw", "-k", "s", "-e", "0", "--object",
        "tls-creds-x509,id=tls0,dir=/pki,endpoint=server", "--tls-creds", "tls0", "-t",
        "--cache=writeback", "--aio=threads", "--discard=unmap", "img",
    ]  # fmt: skip


def test_nbdkit_argv_uses_filters_for_limit_name_and_description() -> None:
    argv = nbdkit_argv(
        ServeOptions(
            socket="s", memory=1024, persistent=True, shared=1, export_name="e", description="d"
        )
    )
    assert argv == [
        "nbdkit", "-U", "s", "-f", "--exit-with-parent", "--filter=limit",
        "--filter=exportname", "memory", "1024", "limit=1", "exportname-strict=true",
        "exportname-list=explicit", "exportname=e", "exportdesc=fixed:d",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("peer", "options", "refused"),
    [
        ("qemu-nbd", {"memory": "1M"}, "memory"),
        ("qemu-nbd", {"image": "i", "minimum_block_size": 512}, "minimum_block_size"),
        ("reference", {"memory": "1M", "cache": "none"}, "cache"),
        ("nbdkit", {"memory": "1M"}, "persistent"),
        ("nbdkit", {"memory": "1M", "persistent": True, "fork": True}, "fork"),
        ("nbdkit", {"persistent": True}, "either memory or an image"),
    ],
)
def test_a_peer_refuses_what_it_cannot_do(
    peer: str, options: dict[str, object], refused: str
) -> None:
    with pytest.raises(PeerCannotDo, match=refused):
        PEERS[peer](ServeOptions(socket="s", **options))  # type: ignore[arg-type]


# ------------------------------------------------------------- processes

# Listens on argv[1] after argv[2] seconds of bind() without listen(), as qemu-nbd does.
LATE_LISTENER = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
print("bound", flush=True)
time.sleep(float(sys.argv[2]))
s.listen()
print("listening", flush=True)
time.sleep(60)
"""


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be too deep.
    path = Path(tempfile.mkdtemp(prefix="nbd-harness-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_ready_means_listening_not_merely_bound(workdir: Path) -> None:
    sock = workdir / "s.sock"
    server = ServerProcess(
        [sys.executable, "-c", LATE_LISTENER, str(sock), "0.3"], log_path=workdir / "log"
    )
    try:
        server.wait_listening(sock, timeout=20)
        assert unix_socket_listening(sock)
        assert "listening" in server.log_text()
    finally:
        server.stop()
    assert server.exit_status() == -signal.SIGTERM


def test_a_server_that_dies_before_listening_fails_the_start_with_its_log(workdir: Path) -> None:
    script = "import sys; print('no such export', file=sys.stderr); sys.exit(3)"
    server = ServerProcess([sys.executable, "-c", script], log_path=workdir / "log")
    try:
        with pytest.raises(ServerStartError, match=r"(?s)status 3.*no such export"):
            server.wait_listening(workdir / "never.sock", timeout=20)
    finally:
        server.stop()


def test_stop_kills_a_server_that_ignores_sigterm(workdir: Path) -> None:
    script = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    server = ServerProcess([sys.executable, "-c", script], log_path=workdir / "log")
    try:
        # SIGTERM must not arrive before the handler is installed.
        wait_until(lambda: "ready" in server.log_text(), "the child to ignore SIGTERM", 20)
    finally:
        server.stop(timeout=0.5)
    assert server.exit_status() == -signal.SIGKILL


def test_a_daemon_is_followed_through_its_pid_file_and_stopped_by_pid(workdir: Path) -> None:
    pid_file = workdir / "pid"
    sock = workdir / "d.sock"
    # The launcher forks a listener, writes its PID, and exits 0 (like --fork).
    script = f"""
import os, socket, sys, time
if os.fork():
    sys.exit(0)
os.setsid()
s = socket.socket(socket.AF_UNIX)
s.bind({str(sock)!r})
s.listen()
open({str(pid_file)!r} + ".tmp", "w").write(f"{{os.getpid()}}\\n")
os.rename({str(pid_file)!r} + ".tmp", {str(pid_file)!r})
time.sleep(60)
"""
    server = ServerProcess([sys.executable, "-c", script], log_path=workdir / "log")
    try:
        server.follow_daemon(pid_file, timeout=20)
        server.wait_listening(sock, timeout=20)
        assert server.daemon_pid is not None
        assert server.pid == server.daemon_pid != server.process.pid
        assert server.running()
    finally:
        server.stop()
    assert server.daemon_pid is not None
    assert not alive(server.daemon_pid)
    assert server.exit_status() is None  # a daemon's status is not ours to read


def test_end_process_tree_ends_a_child_that_left_the_group(tmp_path: Path) -> None:
    # A run (new session) whose child starts a session of its own, as a
    # forked server does: ending the run must end both, by PID.
    pid_file = tmp_path / "child.pid"
    script = f"setsid sleep 60 & echo $! > {pid_file}; wait"
    run = subprocess.Popen(["sh", "-c", script], start_new_session=True, text=True)
    wait_until(pid_file.exists, "the child to start", 10)
    child = int(pid_file.read_text())
    assert child in descendants(run.pid)
    end_process_tree(run, grace=5)
    assert run.poll() is not None
    wait_until(lambda: not alive(child), "the child to end", 10)
