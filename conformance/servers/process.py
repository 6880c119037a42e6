"""Server processes: started to die with us, ready when their Unix socket listens, stopped by PID.

The one way every part of the toolkit starts a server (the conformance
profiles, the iotests, the end-to-end tests, the docs' trace capture, the
benchmarks): qemu's iotests have one ``qemu_nbd_popen`` for the same reason.
What a server is started with comes from :mod:`conformance.servers.peers`;
this module knows only processes, so it imports nothing but the standard
library and can be used by scripts that have no libnbd.

A server is a :class:`ServerProcess` (fork and exec) or, for the reference
server in the conformance suite, a fork server's child
(:mod:`conformance.servers.forkserver`); both are a :class:`StartedServer`,
watched and stopped the same way.

Readiness is a *listening* socket, never a probe connection (a probe counts
against connection limits and makes a server without ``--persistent`` exit)
and never the mere existence of the path: qemu-nbd creates it at ``bind()``,
before ``listen()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
SO_ACCEPTCON = 0x10000  # /proc/net/unix "Flags": the socket is listening
STOP_TIMEOUT = 5.0


class ServerStartError(RuntimeError):
    """The server exited before it listened, or did not listen in time."""


class ChildProcess(Protocol):
    """What the harness uses of a :class:`subprocess.Popen`: a process it can wait for.

    A fork server's child (:mod:`conformance.servers.forkserver`) is one too.
    """

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


class Spawn(Protocol):
    """Another way to start ARGV than fork and exec (a fork server): output to LOG_PATH.

    What it starts runs in its own session and dies with the harness, as a
    :class:`ServerProcess` with ``new_session`` does.
    """

    def __call__(
        self, argv: Sequence[str], *, log_path: Path, cwd: str | Path | None
    ) -> ChildProcess: ...


def _prctl(option: int, arg: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, arg, 0, 0, 0)


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies.

    A test worker killed mid-run runs no teardown; without this its servers
    would outlive it.  Linux only (PR_SET_PDEATHSIG); elsewhere a no-op.
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def become_subreaper() -> None:
    """Make daemons we start (``--fork``) our children when their launcher exits.

    Then :func:`alive` can reap them and no zombie outlives a stop.
    """
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def unix_socket_listening(path: str | Path) -> bool:
    """True once a Unix socket at PATH is listening.

    Linux lists bound sockets in /proc/net/unix by the path they were bound
    to; a server that binds under a temporary name and renames it into place
    once listening (as the reference server does) is ready when the path
    exists.
    """
    path = str(path)
    bound_here = False
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            next(f)
            for line in f:
                fields = line.split()
                # Num RefCount Protocol Flags Type St Inode [Path]
                if len(fields) >= 8 and fields[7] == path:
                    bound_here = True
                    if int(fields[3], 16) & SO_ACCEPTCON:
                        return True
    except OSError:
        pass
    return not bound_here and os.path.exists(path)


def alive(pid: int) -> bool:
    """Whether PID still runs (a zombie counts as gone); reaps it if it is our child.

    Only for processes that no Popen object owns (daemons adopted by a
    subreaper, or not ours at all): reaping a Popen's child here would steal
    its exit status.
    """
    with contextlib.suppress(ChildProcessError):
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every process below PID (servers may sit in sessions of their own), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def end_process_tree(process: subprocess.Popen[str], grace: float) -> None:
    """End a run started in a session of its own, and every process below it.

    SIGTERM to its process group and to each descendant by PID (servers it
    started may have left the group), then SIGKILL to whatever is still
    alive after GRACE seconds; the run itself is reaped.
    """
    pids = [process.pid, *descendants(process.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        for pid in pids[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in pids[1:]):
            time.sleep(0.1)  # polling the condition, bounded by the deadline
        if process.poll() is not None and not any(alive(p) for p in pids[1:]):
            return


def wait_until(
    condition: Callable[[], bool],
    what: str,
    timeout: float,
    error: type[Exception] = TimeoutError,
) -> float:
    """Poll CONDITION until it holds, for at most TIMEOUT seconds; the time it took.

    Raises ERROR ("timed out after ... waiting for WHAT") at the deadline.
    """
    start = time.monotonic()
    delay = 0.002
    while not condition():
        if time.monotonic() - start > timeout:
            raise error(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return time.monotonic() - start


def stop_pid(pid: int, timeout: float = STOP_TIMEOUT) -> signal.Signals | None:
    """Stop a process that no Popen owns: SIGTERM, poll until gone, then SIGKILL.

    Returns the signal that ended it (None: it had already gone).
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive(pid):
            return None if sig == signal.SIGTERM else signal.SIGTERM
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not alive(pid), f"PID {pid} to exit", timeout)
    return signal.SIGKILL


def stop_process(process: ChildProcess, timeout: float = STOP_TIMEOUT) -> None:
    """Stop a child we hold: SIGTERM, wait at most TIMEOUT, then SIGKILL and reap it."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


def describe_exit(status: int | None) -> str:
    """'the server crashed (signal 11, SIGSEGV)' for a returncode of -11."""
    if status is None:
        return "the server exited"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = "unknown signal"
        verb = "was killed" if -status in (signal.SIGTERM, signal.SIGKILL) else "crashed"
        return f"the server {verb} (signal {-status}, {name})"
    return f"the server exited with status {status}"


def with_pythonpath(root: str | Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """ENV (default: ours) with ROOT first on PYTHONPATH: how ``python -m PKG`` finds PKG."""
    env = dict(os.environ if env is None else env)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(root) + (os.pathsep + path if path else "")
    return env


class StartedServer:
    """A server process the harness started, however: its output goes to LOG_PATH; stopped by PID.

    A server that daemonises is followed through its PID file
    (:meth:`follow_daemon`); from then on its PID is the daemon's.  PROCESS
    is the child that was started: a :class:`subprocess.Popen` (see
    :class:`ServerProcess`, which makes one) or a fork server's child
    (:mod:`conformance.servers.forkserver`, made through a :class:`Spawn`).
    """

    def __init__(self, argv: Sequence[str], process: ChildProcess, *, log_path: Path) -> None:
        self.argv = list(argv)
        self.process = process
        self.log_path = log_path
        self.daemon_pid: int | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.argv[0])

    @property
    def pid(self) -> int:
        """The server's PID: the daemon's once followed, else the process we started."""
        return self.process.pid if self.daemon_pid is None else self.daemon_pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, limit: int = 2000) -> str:
        """The last LIMIT characters of what the server printed."""
        return self.log_text()[-limit:]

    def running(self) -> bool:
        if self.daemon_pid is not None:
            return alive(self.daemon_pid)
        return self.process.poll() is None

    def exit_status(self) -> int | None:
        """The returncode (negative: killed by that signal) once it ended; never a daemon's."""
        return None if self.daemon_pid is not None else self.process.poll()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_listening(self, socket_path: str | Path, timeout: float) -> None:
        """Wait until SOCKET_PATH listens; ServerStartError, with the log, if it died first."""

        def ready() -> bool:
            if unix_socket_listening(socket_path):
                return True
            if not self.running():
                raise ServerStartError(
                    f"{self.name} exited before listening "
                    f"({describe_exit(self.exit_status())}): {' '.join(self.argv)}\n"
                    f"{self.log_tail()}"
                )
            return False

        try:
            wait_until(ready, f"{self.name} to listen on {socket_path}", timeout)
        except TimeoutError as exc:
            raise ServerStartError(f"{exc}\n{self.log_tail()}") from None

    def follow_daemon(self, pid_file: Path, timeout: float) -> None:
        """The launcher daemonises: wait for it to exit 0, then take the PID from PID_FILE."""
        deadline = time.monotonic() + timeout
        self.wait_launcher(timeout)
        self.read_pid_file(pid_file, max(0.1, deadline - time.monotonic()))

    def wait_launcher(self, timeout: float) -> None:
        """Wait for the process we started to exit 0, as a daemonising server's does."""
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ServerStartError(f"{self.name} did not daemonise\n{self.log_tail()}") from None
        if status != 0:
            raise ServerStartError(f"{self.name} exited with status {status}\n{self.log_tail()}")

    def read_pid_file(self, pid_file: Path, timeout: float) -> None:
        """From now on the server is the daemon PID_FILE names (once it is complete)."""

        def pid_written() -> bool:
            try:
                text = pid_file.read_text()
            except OSError:
                return False
            if not text.endswith("\n"):  # still being written
                return False
            self.daemon_pid = int(text)
            return True

        try:
            wait_until(pid_written, f"{self.name}'s PID file", timeout)
        except TimeoutError:
            raise ServerStartError(f"{self.name} wrote no PID file\n{self.log_tail()}") from None

    def wait_exit(self, timeout: float) -> int | None:
        """Wait for the server to end: its exit status (None for a daemon: not our child).

        Raises subprocess.TimeoutExpired or TimeoutError at the deadline.
        """
        if self.daemon_pid is None:
            return self.process.wait(timeout)
        daemon = self.daemon_pid
        wait_until(lambda: not alive(daemon), f"PID {daemon} to exit", timeout)
        return None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait at most TIMEOUT, then SIGKILL: always by PID, never left behind."""
        if self.daemon_pid is not None:
            stop_pid(self.daemon_pid, timeout)
        stop_process(self.process, timeout)


class ServerProcess(StartedServer):
    """A server process started by fork and exec, as :class:`subprocess.Popen` does.

    ``child_setup`` runs in the child before exec, after :func:`die_with_parent`
    (e.g. a resource limit).
    """

    process: subprocess.Popen[bytes]

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        new_session: bool = False,
        child_setup: Callable[[], None] | None = None,
    ) -> None:
        def setup() -> None:
            die_with_parent()
            if child_setup is not None:
                child_setup()

        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                cwd=cwd,
                start_new_session=new_session,
                preexec_fn=setup,
            )
        super().__init__(argv, process, log_path=log_path)
