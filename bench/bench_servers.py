"""The servers the benchmarks measure: how each is started, and what it costs while running.

Every server listens on a Unix socket in a temporary directory; each is
started through the suite's one process harness (``conformance/servers/``,
whose ``peers.py`` holds every peer's command line) and stopped by PID.
All are persistent with MULTI_CONN advertised (``-e 0``; nbdkit has no
limit), so that several connections are safe:

``reference``         ``python3 -m reference_server --memory SIZE -t -e 0``
``reference-file``    ``python3 -m reference_server -f raw -t -e 0 IMAGE`` (raw file in /dev/shm)
``*-uvloop``          the same with ``--event-loop=uvloop`` (when uvloop is installed)
``qemu-nbd``          ``qemu-nbd -f raw -t -e 0 --cache=writeback --aio=threads IMAGE``
                      (qemu-nbd's defaults spelled out: page-cache I/O like our file backend)
``nbdkit``            ``nbdkit -f memory SIZE`` (its default of 16 worker threads)
``candidate[-file]``  the reference server from another checkout (``--candidate DIR``)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: the server harness lives in conformance/
    sys.path.insert(1, str(REPO))

from conformance.servers.peers import PEERS, ServeOptions, reference_argv  # noqa: E402
from conformance.servers.process import (  # noqa: E402
    ServerProcess,
    ServerStartError,
    with_pythonpath,
)

MiB = 1024 * 1024
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
DEBUG_ENV = ("PYTHONASYNCIODEBUG", "PYTHONDEVMODE", "PYTHONMALLOC", "PYTHONTRACEMALLOC")


class BenchError(Exception):
    """Something the benchmark cannot work around: printed in one line, exit 1."""


@dataclass(frozen=True)
class ServerKind:
    """How to start one server under test; ``ours`` marks a reference variant."""

    name: str
    peer: str  # the harness's name for it: reference, qemu-nbd, nbdkit
    needs_image: bool
    # Where its reference_server package lives: "reference" (--reference-root)
    # or "candidate" (--candidate, a modified copy measured in the same run).
    root: str = "reference"
    # qemu-nbd's tuning (its defaults spelled out: page-cache I/O like our file backend).
    cache: str | None = None
    aio: str | None = None
    event_loop: str = "asyncio"  # the reference server's --event-loop

    @property
    def ours(self) -> bool:
        return self.peer == "reference"

    @property
    def program(self) -> str:
        return "python3" if self.ours else self.peer


SERVERS = {
    kind.name: kind
    for kind in (
        ServerKind("reference", "reference", False),
        ServerKind("reference-file", "reference", True),
        ServerKind("reference-uvloop", "reference", False, event_loop="uvloop"),
        ServerKind("reference-file-uvloop", "reference", True, event_loop="uvloop"),
        ServerKind("qemu-nbd", "qemu-nbd", True, cache="writeback", aio="threads"),
        ServerKind("nbdkit", "nbdkit", False),
        ServerKind("candidate", "reference", False, "candidate"),
        ServerKind("candidate-file", "reference", True, "candidate"),
    )
}


def has_uvloop(python: str) -> bool:
    """Whether ``python`` (the reference server's interpreter) can import uvloop."""
    probe = [python, "-c", "import uvloop"]
    return subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode == 0


def server_argv(kind: ServerKind, args: argparse.Namespace, sock: str, image: str) -> list[str]:
    """Every server persistent with MULTI_CONN advertised (-e 0; nbdkit has no limit)."""
    options = ServeOptions(
        socket=sock,
        image=image if kind.needs_image else None,
        memory=None if kind.needs_image else args.size,
        persistent=True,
        shared=0,
        cache=kind.cache,
        aio=kind.aio,
        extra=("--event-loop", kind.event_loop) if kind.event_loop != "asyncio" else (),
    )
    if kind.ours:
        return reference_argv(options, python=args.python)
    return PEERS[kind.peer](options)


@dataclass
class Server:
    """A running server process and its socket."""

    kind: ServerKind
    sock: str
    image: str
    server_process: ServerProcess
    log: Path

    @property
    def argv(self) -> list[str]:
        return self.server_process.argv

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.server_process.process

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def _status(self, field: str) -> int | None:
        """A ``kB`` figure of /proc/PID/status, in bytes."""
        try:
            text = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return None

    def peak_rss(self) -> int | None:
        """VmHWM in bytes (the kernel's high-water mark of resident memory)."""
        return self._status("VmHWM")

    def rss(self) -> int | None:
        """VmRSS in bytes: resident memory now."""
        return self._status("VmRSS")

    def private_rss(self) -> int | None:
        """RssAnon + RssFile in bytes: resident memory now, without RssShmem.

        RssShmem counts the pages of tmpfs files the server has mapped: for
        the reference server on a file in /dev/shm, the served file itself
        (its page cache, which exists whether or not it is mapped), not
        memory held for requests.
        """
        anon, file = self._status("RssAnon"), self._status("RssFile")
        return None if anon is None or file is None else anon + file

    @contextlib.contextmanager
    def sampling_private_peak(self, period: float = 0.005) -> Iterator[list[int]]:
        """Sample :meth:`private_rss` every ``period`` seconds while the block runs;
        the list yielded holds the highest value seen (the kernel keeps no peak
        of it, only VmHWM of everything resident)."""
        peak: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while True:
                now = self.private_rss()
                if now is not None and (not peak or now > peak[0]):
                    peak[:] = [now]
                if done.wait(period):
                    return

        thread = threading.Thread(target=sample, name="private-rss", daemon=True)
        thread.start()
        try:
            yield peak
        finally:
            done.set()
            thread.join(timeout=10)

    def cpu_seconds(self) -> float:
        """User and system CPU time of the server process (all its threads) so far."""
        try:
            stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        except OSError:
            return math.nan
        fields = stat.rsplit(")", 1)[1].split()
        # utime and stime are fields 14 and 15 of proc(5), in clock ticks.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.server_process.log_text().splitlines()[-lines:])


@contextlib.contextmanager
def running(
    args: argparse.Namespace, names: Sequence[str], workdir: Path, tag: str
) -> Iterator[dict[str, Server]]:
    """Start every named server (each with its own socket and image); stop all on exit."""
    servers: dict[str, Server] = {}
    try:
        for name in names:
            kind = SERVERS[name]
            sock = str(workdir / f"{tag}-{name}.sock")
            image = ""
            if kind.needs_image:
                image = str(Path(args.image_dir) / f"{workdir.name}-{tag}-{name}.raw")
                with open(image, "wb") as f:
                    f.truncate(args.size)
            log = workdir / f"{tag}-{name}.log"
            # tox's PYTHONASYNCIODEBUG=1 (meant for tests) would slow every request.
            env = {k: v for k, v in os.environ.items() if k not in DEBUG_ENV}
            root = args.candidate if kind.root == "candidate" else args.reference_root
            if kind.ours:
                env = with_pythonpath(root, env)
            process = ServerProcess(
                server_argv(kind, args, sock, image),
                log_path=log,
                env=env,
                cwd=root if kind.ours else workdir,
            )
            servers[name] = Server(kind, sock, image, process, log)
            try:
                process.wait_listening(sock, START_TIMEOUT)
            except ServerStartError as exc:
                raise BenchError(f"{name} did not start: {exc}") from None
        yield servers
    finally:
        for server in servers.values():
            server.server_process.stop(STOP_TIMEOUT)
            if server.image:
                with contextlib.suppress(OSError):
                    os.unlink(server.image)
