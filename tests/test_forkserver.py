"""The reference server's fork server, and the harness's client of it.

The conformance suite starts each check's reference server by fork from
``python -m reference_server.forkserver`` (:mod:`conformance.servers.forkserver`).
That is only right if a forked server is, to everything the suite can
observe, the server ``python -m reference_server`` starts: it listens and
negotiates, it ends with the same exit status for the same reason (an
option it refuses, SIGTERM, a crash), it says why in its log, it runs in a
session of its own, and it does not outlive the run.  Each of those is
checked here against a forked and an exec'd server alike.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conformance.servers.base import LocalServer, ServerConfig
from conformance.servers.forkserver import ForkServer, ForkServerError
from conformance.servers.peers import REPO_ROOT, ServeOptions, reference_argv
from conformance.servers.process import (
    ServerProcess,
    ServerStartError,
    StartedServer,
    alive,
    describe_exit,
    wait_until,
    with_pythonpath,
)
from conformance.servers.reference import Reference

PREFIX = [sys.executable, "-m", "reference_server"]
NBDMAGIC = b"NBDMAGIC"


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be too deep.
    path = Path(tempfile.mkdtemp(prefix="nbd-fork-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def forkserver(workdir: Path) -> Iterator[ForkServer]:
    server = ForkServer(
        PREFIX,
        env=with_pythonpath(REPO_ROOT),
        cwd=REPO_ROOT,
        log_path=workdir / "forkserver.log",
    )
    yield server
    server.close()


def _argv(sock: Path, *extra: str) -> list[str]:
    options = ServeOptions(socket=sock, memory="1M", shared=0, persistent=True, extra=extra)
    return reference_argv(options)


def _start(how: str, argv: list[str], log: Path, forkserver: ForkServer) -> StartedServer:
    """The same ARGV, exec'd as everywhere else, or forked by the fork server."""
    if how == "exec":
        return ServerProcess(argv, log_path=log, env=with_pythonpath(REPO_ROOT), cwd=REPO_ROOT)
    process = forkserver.spawn(argv, log_path=log, cwd=REPO_ROOT)
    return StartedServer(argv, process, log_path=log)


def _greeting(sock: Path) -> bytes:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(20)
        client.connect(str(sock))
        data = b""
        while len(data) < len(NBDMAGIC):
            chunk = client.recv(len(NBDMAGIC) - len(data))
            if not chunk:
                break
            data += chunk
        return data


HOW = pytest.mark.parametrize("how", ["exec", "fork"])


@HOW
def test_a_server_listens_greets_and_ends_cleanly_on_sigterm(
    how: str, workdir: Path, forkserver: ForkServer
) -> None:
    sock = workdir / "s.sock"
    server = _start(how, _argv(sock, "-v"), workdir / "log", forkserver)
    try:
        server.wait_listening(sock, timeout=30)
        assert _greeting(sock) == NBDMAGIC
        assert server.running()
    finally:
        server.stop()
    assert server.exit_status() == 0  # SIGTERM is a shutdown, not a death
    assert "serving memory of 1048576 bytes" in server.log_text()
    assert not alive(server.pid)


@HOW
def test_a_refused_option_ends_the_start_with_status_2_and_the_reason_logged(
    how: str, workdir: Path, forkserver: ForkServer
) -> None:
    sock = workdir / "s.sock"
    server = _start(how, _argv(sock, "--no-such-option"), workdir / "log", forkserver)
    try:
        with pytest.raises(ServerStartError, match=r"(?s)status 2.*unrecognized arguments"):
            server.wait_listening(sock, timeout=30)
    finally:
        server.stop()
    assert server.exit_status() == 2


@HOW
def test_a_crash_is_reported_with_its_signal(
    how: str, workdir: Path, forkserver: ForkServer
) -> None:
    sock = workdir / "s.sock"
    server = _start(how, _argv(sock), workdir / "log", forkserver)
    try:
        server.wait_listening(sock, timeout=30)
        server.signal(signal.SIGSEGV)
        wait_until(lambda: not server.running(), "the server to die", 30)
    finally:
        server.stop()
    assert describe_exit(server.exit_status()) == "the server crashed (signal 11, SIGSEGV)"


def test_a_forked_server_has_a_session_of_its_own_under_the_fork_server(
    workdir: Path, forkserver: ForkServer
) -> None:
    sock = workdir / "s.sock"
    server = _start("fork", _argv(sock), workdir / "log", forkserver)
    try:
        server.wait_listening(sock, timeout=30)
        assert os.getsid(server.pid) == server.pid != os.getsid(0)
        assert forkserver._process is not None
        assert _parent(server.pid) == forkserver._process.pid
    finally:
        server.stop()


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_closing_the_fork_server_ends_the_servers_still_running(
    workdir: Path, forkserver: ForkServer
) -> None:
    socks = [workdir / f"s{i}.sock" for i in range(2)]
    servers = [
        _start("fork", _argv(s), workdir / f"log{i}", forkserver) for i, s in enumerate(socks)
    ]
    for server, sock in zip(servers, socks, strict=True):
        server.wait_listening(sock, timeout=30)
    pids = [server.pid for server in servers]
    forkserver.close()
    wait_until(lambda: not any(alive(pid) for pid in pids), f"PIDs {pids} to end", 30)


def test_a_malformed_request_is_refused_and_the_fork_server_keeps_serving(
    workdir: Path, forkserver: ForkServer
) -> None:
    with pytest.raises(ForkServerError, match="unknown request"):
        forkserver.request({"launch": ["x"]})
    with pytest.raises(ForkServerError, match="not a running child"):
        forkserver.request({"poll": os.getpid()})
    with pytest.raises(ValueError, match="does not start with"):
        forkserver.spawn(["nbdkit", "memory", "1M"], log_path=workdir / "log", cwd=None)
    sock = workdir / "s.sock"
    server = _start("fork", _argv(sock), workdir / "log", forkserver)
    try:
        server.wait_listening(sock, timeout=30)
    finally:
        server.stop()


def test_a_check_s_crash_is_attributed_through_the_reference_profile(workdir: Path) -> None:
    """What the plugin asks after each check (LocalServer.unexpected_exit), for a forked server."""
    profile = Reference()
    try:
        server = profile.start(ServerConfig(size=1 << 20), workdir, None)
        assert isinstance(server, LocalServer)
        try:
            assert server.unexpected_exit() is None
            os.kill(server.server_process.pid, signal.SIGABRT)
            wait_until(lambda: not server.is_running(), "the server to die", 30)
            how = server.unexpected_exit()
        finally:
            server.stop()
    finally:
        profile.close()
    assert how is not None
    assert how.startswith("the server crashed (signal 6, SIGABRT) during the check")


def test_a_fork_server_that_died_is_named_and_a_new_one_serves_the_next_check(
    workdir: Path, forkserver: ForkServer
) -> None:
    first = _start("fork", _argv(workdir / "a.sock"), workdir / "a.log", forkserver)
    first.wait_listening(workdir / "a.sock", timeout=30)
    assert forkserver._process is not None
    forkserver._process.kill()
    forkserver._process.wait(timeout=30)
    with pytest.raises(ForkServerError, match="fork server exited"):
        first.running()
    wait_until(lambda: not alive(first.pid), "its child to end with it", 30)
    second = _start("fork", _argv(workdir / "b.sock"), workdir / "b.log", forkserver)
    try:
        second.wait_listening(workdir / "b.sock", timeout=30)
        assert _greeting(workdir / "b.sock") == NBDMAGIC
    finally:
        second.stop()
    assert second.exit_status() == 0


def test_a_server_started_after_the_environment_changed_is_exec_d_with_it(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork server's children have its environment; a changed one takes an exec."""
    profile = Reference()
    servers = []
    try:
        for name in ("first", "before", "after"):
            # pytest names the running check in the environment: not a change.
            monkeypatch.setenv("PYTEST_CURRENT_TEST", f"test_x.py::{name} (call)")
            if name == "after":
                monkeypatch.setenv("NBD_FORKSERVER_TEST", "changed")
            path = workdir / name
            path.mkdir()
            server = profile.start(ServerConfig(size=1 << 20), path, None)
            assert isinstance(server, LocalServer)
            servers.append(server)
        first, before, after = servers
        assert not isinstance(first.process, subprocess.Popen)
        assert not isinstance(before.process, subprocess.Popen)
        assert isinstance(after.process, subprocess.Popen)
        with open(f"/proc/{after.process.pid}/environ", "rb") as environ:
            assert b"NBD_FORKSERVER_TEST=changed" in environ.read().split(b"\0")
    finally:
        for server in servers:
            server.stop()
        profile.close()


def test_an_answer_left_behind_by_an_interrupted_request_is_not_taken_for_the_next(
    workdir: Path, forkserver: ForkServer
) -> None:
    """A check's timeout may interrupt the harness between a request and its answer."""
    sock = workdir / "s.sock"
    server = _start("fork", _argv(sock), workdir / "log", forkserver)
    try:
        server.wait_listening(sock, timeout=30)
        # As if interrupted: the request is sent, its answer never read.
        forkserver._start()
        process = forkserver._process
        assert process is not None and process.stdin is not None
        forkserver._sent += 1
        request = {"spawn": ["--no-such-option"], "log": os.devnull, "cwd": "/"}
        process.stdin.write(json.dumps({**request, "id": forkserver._sent}).encode() + b"\n")
        process.stdin.flush()
        assert server.running()  # a poll: not the spawn's answer
    finally:
        server.stop()
    assert server.exit_status() in (0, -signal.SIGTERM)
