"""Shared helpers that let an iotests scenario read like a story.

A scenario starts the server under test, runs real tools against it and logs what a
reader needs to see; iotests/check compares that log with the golden file.  Everything
here bounds its waits with a deadline, and every server it starts is stopped by its PID
when the scenario ends, even when it fails.

The environment comes from iotests/check: IOTESTS_SERVER names the server profile
(reference, qemu-nbd, nbdkit) and IOTESTS_TEST_DIR is a fresh scratch directory.  Run
directly (``python iotests/NAME``) a scenario makes its own directory and uses the
reference server.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

IOTESTS_DIR = Path(__file__).resolve().parent
REPO = IOTESTS_DIR.parent
if str(REPO) not in sys.path:  # run as python iotests/NAME, outside iotests/check
    sys.path.insert(1, str(REPO))

from conformance.servers import process  # noqa: E402 - needs REPO on sys.path
from conformance.servers.peers import PEERS, ServeOptions  # noqa: E402

SERVER = os.environ.get("IOTESTS_SERVER", "reference")
# Upper bound of any single wait: a tool run, a server start, a server exit.
TIMEOUT = float(os.environ.get("IOTESTS_WAIT", "20"))

if "IOTESTS_TEST_DIR" in os.environ:
    test_dir = Path(os.environ["IOTESTS_TEST_DIR"])
else:
    test_dir = Path(tempfile.mkdtemp(prefix="iotests-"))
    print(f"(test directory: {test_dir})", file=sys.stderr)
sock = test_dir / "nbd.sock"


def uri(socket_path: Path = sock, export: str = "", tls_dir: Path | None = None) -> str:
    """The NBD URI (nbd+unix or, with TLS, nbds+unix) of an export on a Unix socket."""
    if tls_dir is None:
        return f"nbd+unix:///{export}?socket={socket_path}"
    return f"nbds+unix:///{export}?socket={socket_path}&tls-certificates={tls_dir}"


# ---------------------------------------------------------------------------- logging


def log(msg: object = "", filters: Sequence[Callable[[str], str]] = ()) -> None:
    """Print one line (or a dict/list as indented JSON), like qemu iotests' log()."""
    text = msg if isinstance(msg, str) else json.dumps(msg, indent=2, sort_keys=True)
    for f in filters:
        text = f(text)
    print(text, flush=True)


def section(title: str) -> None:
    log("")
    log(f"=== {title} ===")


def notrun(reason: str) -> NoReturn:
    """Skip this scenario: iotests/check reports it as "not run" with the reason."""
    (test_dir / "notrun").write_text(reason + "\n", encoding="utf-8")
    sys.exit(0)


def require_module(name: str) -> Any:
    """Import an optional module (nbd, pexpect) or skip the scenario without it."""
    try:
        return __import__(name)
    except ImportError:
        notrun(f"Python module {name!r} is not importable from {sys.executable}")


def require_program(name: str) -> None:
    """Skip the scenario when a tool it needs is not installed."""
    if shutil.which(name) is None:
        notrun(f"{name} is not installed")


def describe(data: bytes) -> str:
    """A short human description of a buffer: "65536 bytes of 0xa5" or its runs."""
    if not data:
        return "0 bytes"
    runs: list[tuple[int, int]] = []
    for byte in data:
        if runs and runs[-1][0] == byte:
            runs[-1] = (byte, runs[-1][1] + 1)
        else:
            runs.append((byte, 1))
    if len(runs) > 4:
        return f"{len(data)} bytes of mixed content"
    return ", ".join(f"{n} bytes of {b:#04x}" for b, n in runs)


def yes(flag: object) -> str:
    return "yes" if flag else "no"


# ---------------------------------------------------------------------------- tools


@dataclasses.dataclass
class Completed:
    argv: list[str]
    status: int
    output: str


def run(*argv: str, timeout: float = TIMEOUT, input: str | None = None) -> Completed:
    """Run a tool to completion (killed at the deadline); stdout and stderr together."""
    require_program(argv[0])
    proc = subprocess.run(
        argv,
        cwd=test_dir,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Completed(list(argv), proc.returncode, proc.stdout)


def run_log(
    *argv: str, timeout: float = TIMEOUT, filters: Sequence[Callable[[str], str]] = ()
) -> Completed:
    """Run a tool and log its command line, its output and a non-zero exit status."""
    log("$ " + shlex.join(argv))
    res = run(*argv, timeout=timeout)
    if res.output:
        log(res.output.rstrip("\n"), filters)
    if res.status != 0:
        log(f"[exit status {res.status}]")
    return res


def qemu_img(*args: str) -> Completed:
    return run_log("qemu-img", *args)


def qemu_io(*args: str, filters: Sequence[Callable[[str], str]] = ()) -> Completed:
    return run_log("qemu-io", *args, filters=filters)


def filter_qemu_io_order(text: str) -> str:
    """Sort qemu-io's per-request reports by offset: asynchronous requests (aio_write)
    may complete in any order, and a server is free to reply out of order."""
    lines = text.split("\n")
    reports: list[tuple[int, str, str]] = []
    rest: list[str] = []
    i = 0
    while i < len(lines):
        m = re.match(r"(wrote|read) \d+/\d+ bytes at offset (\d+)$", lines[i])
        if m and i + 1 < len(lines):
            reports.append((int(m.group(2)), lines[i], lines[i + 1]))
            i += 2
        else:
            rest.append(lines[i])
            i += 1
    ordered = [line for _, a, b in sorted(reports) for line in (a, b)]
    return "\n".join(rest + ordered)


def nbdinfo(*args: str) -> Completed:
    return run_log("nbdinfo", *args)


def nbdcopy(*args: str) -> Completed:
    return run_log("nbdcopy", *args)


def nbdinfo_json(target: str) -> dict[str, Any]:
    """The first export of `nbdinfo --json` (not logged: callers log what matters)."""
    res = run("nbdinfo", "--json", target)
    if res.status != 0:
        raise RuntimeError(f"nbdinfo --json failed ({res.status}): {res.output}")
    info: dict[str, Any] = json.loads(res.output)
    export: dict[str, Any] = info["exports"][0]
    export["TLS"] = info["TLS"]
    return export


def log_flags(target: str, keys: Sequence[str]) -> None:
    """Log chosen fields of what the server advertises, as nbdinfo sees them."""
    info = nbdinfo_json(target)
    log("  ".join(f"{k}={json.dumps(info.get(k))}" for k in keys))


def create_image(name: str, size: int) -> Path:
    """A sparse raw image file of `size` bytes in the test directory."""
    path = test_dir / name
    with path.open("wb") as f:
        f.truncate(size)
    return path


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    process.wait_until(condition, what, timeout)


# ---------------------------------------------------------------------------- servers
#
# Command lines and process lifecycle come from the toolkit's one server harness
# (conformance/servers/peers.py and process.py); what is here is the scenarios'
# vocabulary and the TIMEOUT every wait is bounded by.

# Daemons started with --fork are re-parented to us, so we can reap them.
process.become_subreaper()


@dataclasses.dataclass
class ServerOptions:
    """What a scenario asks of a server, in qemu-nbd's vocabulary."""

    image: Path | None = None
    memory: str | None = None
    socket: Path = sock
    readonly: bool = False
    shared: int | None = None
    persistent: bool = False
    export_name: str | None = None
    description: str | None = None
    fork: bool = False
    pid_file: Path | None = None
    tls_dir: Path | None = None

    def serve_options(self) -> ServeOptions:
        return ServeOptions(
            socket=self.socket,
            image=self.image,
            memory=self.memory,
            read_only=self.readonly,
            shared=self.shared,
            persistent=self.persistent,
            export_name=self.export_name,
            description=self.description,
            fork=self.fork,
            pid_file=self.pid_file,
            tls_dir=self.tls_dir,
            # Like the reference server, honour NBD_CMD_TRIM instead of ignoring it.
            discard="unmap" if SERVER == "qemu-nbd" and not self.readonly else None,
        )


_servers: list[Server] = []


class Server(process.ServerProcess):
    """A server under test, started by start_server() and stopped by PID."""

    def __init__(self, options: ServerOptions, argv: list[str]) -> None:
        self.options = options
        self.socket = options.socket
        super().__init__(
            argv,
            log_path=test_dir / f"server-{len(_servers)}.log",
            env=process.with_pythonpath(REPO),
            cwd=test_dir,
        )
        self.listening_when_parent_exited = False
        _servers.append(self)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The process start_server() ran (with --fork, the launcher: self.pid is the daemon)."""
        return self.process

    @property
    def uri(self) -> str:
        return uri(self.socket, self.options.export_name or "", None)

    def output(self) -> str:
        return self.log_text()

    def wait_ready(self) -> None:
        if self.options.fork:
            # With --fork the process we started exits once the daemon is ready.
            self.wait_launcher(TIMEOUT)
            self.listening_when_parent_exited = process.unix_socket_listening(self.socket)
            assert self.options.pid_file is not None
            self.read_pid_file(self.options.pid_file, TIMEOUT)
        self.wait_listening(self.socket, TIMEOUT)

    def wait_exit(self, timeout: float = TIMEOUT) -> int | None:
        """Wait for the server to exit; its exit status (None for an adopted daemon)."""
        return super().wait_exit(timeout)

    def stop(self, timeout: float = TIMEOUT) -> None:
        """Terminate, wait with a deadline, then kill: always by PID."""
        super().stop(timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(image: Path | None = None, **options: Any) -> Server:
    """Start the server under test on a Unix socket and wait until it listens."""
    opts = ServerOptions(image=image, **options)
    with contextlib.suppress(FileNotFoundError):
        opts.socket.unlink()
    argv = PEERS[SERVER](opts.serve_options())
    require_program(argv[0])
    server = Server(opts, argv)
    server.wait_ready()
    return server


def _stop_all() -> None:
    for server in reversed(_servers):
        with contextlib.suppress(Exception):
            server.stop()


atexit.register(_stop_all)
# iotests/check sends SIGTERM on timeout: exit through atexit so servers are stopped.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


# ---------------------------------------------------------------------------- libnbd


def nbd_module() -> Any:
    return require_module("nbd")


def connect(target: str, timeout: float = TIMEOUT) -> Any:
    """A connected libnbd handle, or an exception when the server does not serve us."""
    handle, outcome = try_connect(target, timeout)
    if handle is None:
        raise RuntimeError(f"could not connect to {target}: {outcome}")
    return handle


def try_connect(target: str, wait: float) -> tuple[Any, str]:
    """Connect without blocking for ever: (handle, "served") or (None, what happened).

    A server at its connection limit may leave the client in the listen backlog
    (qemu-nbd) or close it (a refusal); both are reported as "not served".
    """
    nbd = nbd_module()
    h = nbd.NBD()
    # libnbd closes a handle when its last reference goes: returning None drops it.
    try:
        h.aio_connect_uri(target)
        deadline = time.monotonic() + wait
        while h.aio_is_connecting():
            left = deadline - time.monotonic()
            if left <= 0:
                return None, "not served (no handshake)"
            h.poll(max(1, int(left * 1000)))
    except nbd.Error as e:
        return None, f"not served ({e.string})"
    if h.aio_is_ready():
        return h, "served"
    return None, "not served (connection closed)"


def drain(
    h: Any, cookies: Sequence[int], timeout: float = TIMEOUT
) -> tuple[set[int], dict[int, int]]:
    """Drive a libnbd handle until every command has succeeded or failed, or the
    connection is dead.  Returns the indexes (into `cookies`) of the commands that
    succeeded, and the errno of each that failed; the others were never answered."""
    nbd = nbd_module()
    succeeded: set[int] = set()
    failed: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while True:
        for i, cookie in enumerate(cookies):
            if i in succeeded or i in failed:
                continue
            try:
                if h.aio_command_completed(cookie):
                    succeeded.add(i)
            except nbd.Error as e:
                failed[i] = e.errno
        if len(succeeded) + len(failed) == len(cookies) or h.aio_is_dead():
            return succeeded, failed
        if time.monotonic() > deadline:
            raise TimeoutError(f"commands still in flight after {timeout:.0f}s")
        # If the connection dies, the loop above collects the failures.
        with contextlib.suppress(nbd.Error):
            h.poll(100)


def wait_for_commands(h: Any, cookies: Sequence[int], timeout: float = TIMEOUT) -> None:
    """Drive a libnbd handle until the given commands have all succeeded."""
    succeeded, _ = drain(h, cookies, timeout)
    if len(succeeded) != len(cookies):
        raise RuntimeError(f"{len(cookies) - len(succeeded)} command(s) failed")


@contextlib.contextmanager
def clients(target: str, count: int) -> Iterator[list[Any]]:
    """`count` connected libnbd handles, shut down at the end."""
    handles: list[Any] = []
    try:
        for _ in range(count):
            handles.append(connect(target))
        yield handles
    finally:
        for h in handles:
            with contextlib.suppress(Exception):
                h.shutdown()
