#!/usr/bin/env python3
"""Load held (issue 16): many simultaneous verifying clients, the reference server beside its peers.

    python bench/load_bench.py [--clients 64,256,1000] [--servers reference,qemu-nbd,nbdkit]
                               [--json FILE]

What an operator would try: N fio jobs start at once, each opens its own NBD
connection (fio's ``nbd`` engine, libnbd underneath), writes its own 2 MiB
region in 4 KiB random writes at iodepth 4 and reads it back verifying every
block with crc32c::

    fio --ioengine=nbd --numjobs=N --size=2M --offset_increment=2M --rw=randwrite \\
        --bs=4k --iodepth=4 --verify=crc32c --thread

(``--thread``: one fio process with N threads rather than N processes, so
that 1,000 clients fit on a 2-core machine beside the server.)  Each server
gets a fresh export of max(512M, N x 2M) and listens on a Unix socket in a
temporary directory:

``reference``  ``python3 -m reference_server --memory SIZE -t -e 0`` (the issue's command)
``qemu-nbd``   ``qemu-nbd -f raw -t -e 0 --cache=writeback --aio=threads IMAGE``
               (IMAGE in /dev/shm: its data is page cache, not counted in its RSS)
``nbdkit``     ``nbdkit -f memory SIZE``

The table gives, per server and client count: the jobs that failed (fio's
per-job error, e.g. "Connection reset by peer" at connect, or a verify
error), the wall time of the fio run, and the server's peak RSS (VmHWM).

1,000 clients need more than the usual 1,024 file descriptors in fio and in
the server: the bench raises its soft RLIMIT_NOFILE to the hard limit (the
children inherit it) and says so; it stops with an error if the hard limit
is too low.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_servers import REPO, SERVERS, BenchError, Server, running

MiB = 1024 * 1024
REGION = 2 * MiB


@dataclass
class Outcome:
    server: str
    clients: int
    failed: int
    errors: list[str]
    wall: float
    peak_rss: int | None
    finished: bool = True  # False: fio still ran at --fio-timeout (failures unknown)


def raise_fd_limit(clients: int) -> str:
    """Soft RLIMIT_NOFILE up to the hard limit; an error if even that cannot hold the run."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * clients + 256  # fio: a socket per job plus files; the server: a socket per client
    if hard != resource.RLIM_INFINITY and hard < need:
        raise BenchError(f"RLIMIT_NOFILE hard limit {hard} < {need} needed for {clients} clients")
    if soft == hard:
        return f"RLIMIT_NOFILE soft limit already at the hard limit, {hard}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return f"RLIMIT_NOFILE soft limit raised from {soft} to {hard} (fio and the servers inherit it)"


def fio_argv(server: Server, clients: int) -> list[str]:
    return [
        "fio",
        "--output-format=json",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={server.uri}",
        "--thread",
        f"--numjobs={clients}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=4",
        "--size=2M",
        "--offset_increment=2M",
        "--verify=crc32c",
        "--verify_state_save=0",  # no per-job state file left in the working directory
        "--randrepeat=0",
    ]


def run_one(server: Server, clients: int, timeout: float) -> tuple[int, list[str], float, bool]:
    """(jobs failed, their distinct errors, wall seconds, finished) of one fio run."""
    start = time.monotonic()
    try:
        done = subprocess.run(
            fio_argv(server, clients),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=Path(server.sock).parent,
        )
    except subprocess.TimeoutExpired:
        return 0, [f"fio still running after {timeout:.0f} s"], time.monotonic() - start, False
    wall = time.monotonic() - start
    start_json = done.stdout.find("{")
    try:
        report = json.loads(done.stdout[start_json:])
    except ValueError:
        lines = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return clients, ["fio printed no JSON: " + " | ".join(lines)], wall, True
    jobs = report.get("jobs", [])
    failed = [j for j in jobs if j.get("error", 0)]
    missing = clients - len(jobs)
    # fio's stderr names the cause per job ("fio: ... Connection reset by peer").
    causes = sorted(
        {
            line.split(":", 1)[-1].strip()[:80]
            for line in done.stderr.splitlines()
            if "error" in line.lower() or "reset" in line.lower() or "fail" in line.lower()
        }
    )
    return len(failed) + max(missing, 0), causes[:5], wall, True


def measure(args: argparse.Namespace, name: str, clients: int, workdir: Path) -> Outcome:
    size = max(512 * MiB, clients * REGION)
    server_args = argparse.Namespace(
        size=size,
        image_dir=args.image_dir,
        python=args.python,
        reference_root=REPO,
        candidate=None,
    )
    with running(server_args, [name], workdir, f"n{clients}") as servers:
        server = servers[name]
        failed, errors, wall, finished = run_one(server, clients, args.fio_timeout)
        rss = server.peak_rss()
        if server.process.poll() is not None:
            errors.append(f"the server exited with status {server.process.returncode}")
    return Outcome(name, clients, failed, errors, wall, rss, finished)


def print_table(outcomes: Sequence[Outcome]) -> None:
    print(f"{'clients':>8}  {'server':<10} {'failed':>7} {'wall s':>8} {'peak RSS':>10}  errors")
    for o in outcomes:
        rss = f"{o.peak_rss / MiB:.0f} MiB" if o.peak_rss else "?"
        errors = "; ".join(o.errors) if o.failed or not o.finished else ""
        failed = str(o.failed) if o.finished else "?"
        wall = f"{o.wall:.1f}" if o.finished else f">{o.wall:.0f}"
        print(f"{o.clients:>8}  {o.server:<10} {failed:>7} {wall:>8} {rss:>10}  {errors}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="64,256,1000", help="client counts; default 64,256,1000")
    p.add_argument("--servers", default="reference,qemu-nbd,nbdkit", help="servers to compare")
    p.add_argument("--image-dir", default="/dev/shm", help="where raw images go; default /dev/shm")
    p.add_argument("--python", default=sys.executable, help="interpreter for the reference server")
    p.add_argument("--fio-timeout", type=float, default=600, help="seconds per fio run (600)")
    p.add_argument("--json", metavar="FILE", help="also save the outcomes as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    counts = [int(n) for n in args.clients.split(",")]
    names = args.servers.split(",")
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        print(f"load_bench: unknown servers {unknown}; known: {sorted(SERVERS)}", file=sys.stderr)
        return 2
    outcomes: list[Outcome] = []
    try:
        print(raise_fd_limit(max(counts)))
        with tempfile.TemporaryDirectory(prefix="nbd-load-") as tmp:
            for clients in counts:
                for name in names:
                    outcome = measure(args, name, clients, Path(tmp))
                    outcomes.append(outcome)
                    verdict = f"{outcome.failed} failed" if outcome.finished else "unfinished"
                    print(
                        f"  {name} with {clients} clients: {verdict}, {outcome.wall:.1f} s",
                        flush=True,
                    )
    except BenchError as exc:
        print(f"load_bench: {exc}", file=sys.stderr)
        return 1
    print()
    print_table(outcomes)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")
    ours = [o for o in outcomes if SERVERS[o.server].ours]
    return 0 if all(o.finished and not o.failed for o in ours) else 1


if __name__ == "__main__":
    sys.exit(main())
