"""The scaling table: how each server grows with the work, measured side by side in one run.

Three measurements per server (issue 15), each server started fresh:

* **throughput at 1, 4 and 16 connections**: fio 4 KiB random reads at
  iodepth 16 per connection (``numjobs`` = connections), MiB/s summed;
* **memory per idle connection**: resident memory (VmRSS) before and after
  opening ``--idle`` connections (1,000 by default) that each finish the
  handshake (libnbd, NBD_OPT_GO) and then sit idle in the transmission phase;
* **time to first byte under load**: while 4 connections run 4 KiB random
  reads at iodepth 16, the time from ``connect()`` on a new socket to the
  first byte of the server's greeting, over ``--probes`` connections.

Used by ``bench/fio_bench.py`` (its last section; ``--no-scaling`` skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench_servers import BenchError, MiB, Server, running
from fio_jobs import Job, fio_argv, prefill, run_fio

CONNECTIONS = (1, 4, 16)
LOAD_JOB = Job("ttfb-load-rand-read-4K-qd16-4conn", "randread", "4k", 16, numjobs=4)
LOAD_STARTED_CPU = 0.2  # seconds of server CPU that show the load has begun
LOAD_START_TIMEOUT = 30.0
PROBE_TIMEOUT = 10.0


@dataclass
class Scaling:
    """Per server: MiB/s per connection count, idle memory, time to first byte."""

    mib_s: dict[str, dict[int, float]] = field(default_factory=dict)
    idle_rss: dict[str, tuple[int | None, int | None, int]] = field(default_factory=dict)
    idle_errors: dict[str, str] = field(default_factory=dict)
    ttfb: dict[str, list[float]] = field(default_factory=dict)


def raise_fd_limit(needed: int) -> None:
    """Idle connections need a descriptor each here and in the server (which inherits this)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(f"--idle needs {needed} file descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def check_ready(idle: int) -> None:
    """Fail before anything runs if this section cannot: libnbd's bindings, descriptors."""
    try:
        import nbd  # noqa: F401
    except ImportError:
        raise BenchError(
            "the scaling table opens its idle connections with libnbd's Python bindings: "
            "apt-get install python3-libnbd, and run with a Python that sees them "
            "(/usr/bin/python3, or tox -e bench); --no-scaling skips the table"
        ) from None
    raise_fd_limit(idle + 256)


def idle_connections(server: Server, count: int) -> tuple[int | None, int | None, int, str]:
    """RSS before and with COUNT negotiated idle connections; how many opened; first error."""
    import nbd  # libnbd's bindings (Debian's python3-libnbd): only this section needs them

    before = server.rss()
    handles = []
    error = ""
    try:
        for _ in range(count):
            h = nbd.NBD()
            try:
                h.connect_unix(server.sock)
            except nbd.Error as exc:
                error = str(exc)
                break
            handles.append(h)
        after = server.rss()
    finally:
        for h in handles:
            with contextlib.suppress(nbd.Error):
                h.shutdown()
        handles.clear()
    return before, after, count if not error else len(handles), error


def first_byte(sock_path: str) -> float:
    """Seconds from connect() to the first byte of the greeting."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(PROBE_TIMEOUT)
        start = time.monotonic()
        s.connect(sock_path)
        if not s.recv(1):
            raise BenchError(f"{sock_path}: closed before greeting")
        return time.monotonic() - start


@contextlib.contextmanager
def loaded(args: argparse.Namespace, server: Server) -> Iterator[None]:
    """fio's LOAD_JOB runs against SERVER for the duration (begun: its CPU time moved)."""
    quiet = argparse.Namespace(**{**vars(args), "runtime": args.runtime + 5})
    cpu = server.cpu_seconds()
    fio = subprocess.Popen(
        fio_argv(quiet, server, LOAD_JOB, timed=True),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + LOAD_START_TIMEOUT
        while server.cpu_seconds() - cpu < LOAD_STARTED_CPU:
            if fio.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the load on {server.kind.name} did not start")
            time.sleep(0.05)  # polling the condition above, not standing in for it
        yield
    finally:
        fio.kill()
        fio.wait(timeout=30)


def measure(
    args: argparse.Namespace, names: list[str], workdir: Path, log: Callable[[str], None] = print
) -> Scaling:
    check_ready(args.idle)
    result = Scaling()
    for name in names:
        with running(args, [name], workdir, "scaling") as servers:
            server = servers[name]
            prefill(args, server)
            result.mib_s[name] = {}
            for n in CONNECTIONS:
                job = Job(f"rand-read-4K-qd16-{n}conn", "randread", "4k", 16, numjobs=n)
                result.mib_s[name][n] = run_fio(args, server, job).mib_s
                log(f"  scaling {name:22} {n:3} connections {result.mib_s[name][n]:9.1f} MiB/s")
            with loaded(args, server):
                result.ttfb[name] = [first_byte(server.sock) for _ in range(args.probes)]
            log(f"  scaling {name:22} first byte under load {_ms(result.ttfb[name])}")
            before, after, opened, error = idle_connections(server, args.idle)
            result.idle_rss[name] = (before, after, opened)
            if error:
                result.idle_errors[name] = error
            rss = f"RSS {_mib(before)} -> {_mib(after)} MiB"
            log(f"  scaling {name:22} {opened} idle connections: {rss}")
    return result


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.1f}"


def _ms(samples: list[float]) -> str:
    if not samples:
        return "-"
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"{1000 * statistics.median(ordered):.2f} / {1000 * p95:.2f}"


def print_table(result: Scaling, names: list[str], out: Callable[[str], None] = print) -> None:
    width = 42
    col = max(12, *(len(n) + 2 for n in names))
    out("Scaling: rand read 4K, iodepth 16 per connection (MiB/s)")
    out("connections".ljust(width) + "".join(n.rjust(col) for n in names))
    for n in CONNECTIONS:
        cells = (f"{result.mib_s.get(s, {}).get(n, float('nan')):.1f}" for s in names)
        out(f"{n}".ljust(width) + "".join(c.rjust(col) for c in cells))
    rows: list[tuple[str, Callable[[str], str]]] = [
        ("RSS idle, MiB", lambda s: _mib(result.idle_rss[s][0])),
        ("RSS with the idle connections, MiB", lambda s: _mib(result.idle_rss[s][1])),
        ("idle connections opened", lambda s: str(result.idle_rss[s][2])),
        ("KiB per idle connection", lambda s: _per_connection(result, s)),
        ("first byte under load, ms (median / p95)", lambda s: _ms(result.ttfb.get(s, []))),
    ]
    for label, cell in rows:
        out(label.ljust(width) + "".join(cell(s).rjust(col) for s in names))
    for name, error in result.idle_errors.items():
        out(f"{name}: stopped opening idle connections: {error}")


def _per_connection(result: Scaling, name: str) -> str:
    before, after, opened = result.idle_rss[name]
    if before is None or after is None or not opened:
        return "-"
    return f"{(after - before) / 1024 / opened:.1f}"
