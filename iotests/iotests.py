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
import ctypes
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
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------------------- servers


def _become_subreaper() -> None:
    """Daemons started with --fork are re-parented to us, so we can reap them."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_child_subreaper = 36
        libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0)


_become_subreaper()


def _die_with_parent() -> None:
    """In a server child: get SIGTERM if this scenario dies, so no server outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


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


def _reference_argv(o: ServerOptions) -> list[str]:
    argv = [sys.executable, "-m", "reference_server", "-k", str(o.socket)]
    argv += _common_flags(o)
    if o.tls_dir is not None:
        argv += [f"--tls-creds={o.tls_dir}"]
    if o.memory is not None:
        return [*argv, "--memory", o.memory]
    assert o.image is not None
    return [*argv, "-f", "raw", str(o.image)]


def _qemu_nbd_argv(o: ServerOptions) -> list[str]:
    if o.memory is not None:
        raise ValueError("qemu-nbd has no memory backend")
    assert o.image is not None
    argv = ["qemu-nbd", "-k", str(o.socket), *_common_flags(o)]
    if not o.readonly:
        # Like the reference server, honour NBD_CMD_TRIM instead of ignoring it.
        argv += ["--discard=unmap"]
    if o.tls_dir is not None:
        argv += [
            "--object",
            f"tls-creds-x509,id=tls0,dir={o.tls_dir},endpoint=server",
            "--tls-creds",
            "tls0",
        ]
    return [*argv, "-f", "raw", str(o.image)]


def _common_flags(o: ServerOptions) -> list[str]:
    argv = []
    if o.readonly:
        argv.append("-r")
    if o.shared is not None:
        argv.append(f"--shared={o.shared}")
    if o.persistent:
        argv.append("--persistent")
    if o.export_name is not None:
        argv.append(f"--export-name={o.export_name}")
    if o.description is not None:
        argv.append(f"--description={o.description}")
    if o.fork:
        argv.append("--fork")
    if o.pid_file is not None:
        argv.append(f"--pid-file={o.pid_file}")
    return argv


def _nbdkit_argv(o: ServerOptions) -> list[str]:
    # nbdkit has no connection limit (-e 0 is its only mode) and never exits
    # after its last client.
    if o.shared not in (None, 0) or o.fork or not o.persistent:
        raise ValueError("the nbdkit profile covers persistent servers without a limit only")
    argv = ["nbdkit", "-U", str(o.socket), "-f"]
    if o.tls_dir is not None:
        argv += ["--tls=require", f"--tls-certificates={o.tls_dir}"]
    if o.readonly:
        argv.append("-r")
    if o.export_name is not None:
        argv += ["-e", o.export_name]
    params = []
    if o.description is not None:
        # nbdkit's -D is for debug flags; descriptions come from a filter.
        argv.append("--filter=exportname")
        params.append(f"exportdesc=fixed:{o.description}")
        if o.export_name is not None:
            params += ["exportname-list=explicit", f"exportname={o.export_name}"]
    if o.memory is not None:
        return [*argv, "memory", o.memory, *params]
    return [*argv, "file", str(o.image), *params]


PROFILES: dict[str, Callable[[ServerOptions], list[str]]] = {
    "reference": _reference_argv,
    "qemu-nbd": _qemu_nbd_argv,
    "nbdkit": _nbdkit_argv,
}


def _listening(path: Path) -> bool:
    """Whether a Unix socket bound at `path` is in the listening state (/proc/net/unix)."""
    so_acceptcon = 0x10000
    with open("/proc/net/unix", encoding="utf-8") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(path):
                return bool(int(fields[3], 16) & so_acceptcon)
    return False


def _alive(pid: int) -> bool:
    """Whether `pid` still runs; reaps it if it is our (possibly adopted) child."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


_servers: list[Server] = []


class Server:
    """A server under test, started by start_server() and stopped by PID."""

    def __init__(self, options: ServerOptions, argv: list[str]) -> None:
        self.options = options
        self.socket = options.socket
        self.log_path = test_dir / f"server-{len(_servers)}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        with self.log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                argv,
                cwd=test_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        # With --fork the process we started exits once the daemon is ready.
        self.pid = self.proc.pid
        self.daemon_pid: int | None = None
        self.listening_when_parent_exited = False
        _servers.append(self)

    @property
    def uri(self) -> str:
        return uri(self.socket, self.options.export_name or "", None)

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self) -> None:
        if self.options.fork:
            status = self.proc.wait(TIMEOUT)
            if status != 0:
                raise RuntimeError(f"server --fork parent exited {status}:\n{self.output()}")
            self.listening_when_parent_exited = self.socket.exists() and (
                SERVER == "reference" or _listening(self.socket)
            )
            assert self.options.pid_file is not None
            self.daemon_pid = int(self.options.pid_file.read_text().strip())
            self.pid = self.daemon_pid

        def ready() -> bool:
            if not self.options.fork and self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with status {self.proc.returncode} before listening:\n"
                    + self.output()
                )
            if not self.socket.exists():
                return False
            # The reference server renames its socket into place once listening; qemu-nbd
            # binds the final path, so also wait for the listening state there.
            return SERVER == "reference" or _listening(self.socket)

        wait_until(ready, f"{SERVER} to listen on {self.socket.name}")

    def running(self) -> bool:
        if self.daemon_pid is not None:
            return _alive(self.daemon_pid)
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = TIMEOUT) -> int | None:
        """Wait for the server to exit; its exit status (None for an adopted daemon)."""
        if self.daemon_pid is None:
            return self.proc.wait(timeout)
        daemon = self.daemon_pid
        wait_until(lambda: not _alive(daemon), "the daemon to exit", timeout)
        return None

    def stop(self) -> None:
        """Terminate, wait with a deadline, then kill: always by PID."""
        if not self.running():
            return
        with contextlib.suppress(ProcessLookupError):
            self.signal(signal.SIGTERM)
        try:
            self.wait_exit(TIMEOUT)
        except (TimeoutError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait_exit(TIMEOUT)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(image: Path | None = None, **options: Any) -> Server:
    """Start the server under test on a Unix socket and wait until it listens."""
    opts = ServerOptions(image=image, **options)
    with contextlib.suppress(FileNotFoundError):
        opts.socket.unlink()
    argv = PROFILES[SERVER](opts)
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
