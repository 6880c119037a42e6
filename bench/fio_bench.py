#!/usr/bin/env python3
"""Throughput of the reference server against qemu-nbd and nbdkit, measured with fio.

    python bench/fio_bench.py [--repeat 3] [--runtime 5] [--size 256M] [--json FILE]

Every server listens on a Unix socket in a temporary directory and is driven
by fio's ``nbd`` ioengine (libnbd underneath, so structured replies are
negotiated as a real client would).  The servers, all started with
MULTI_CONN advertised (``-e 0`` or nbdkit's default) so that 4 connections
are safe:

``reference``       ``python3 -m reference_server --memory SIZE -t -e 0``
``reference-file``  ``python3 -m reference_server -f raw -t -e 0 IMAGE`` (raw file in /dev/shm)
``qemu-nbd``        ``qemu-nbd -f raw -t -e 0 --cache=writeback --aio=threads IMAGE``
                    (qemu-nbd's defaults spelled out: page-cache I/O like our file backend)
``nbdkit``          ``nbdkit -f memory SIZE`` (its default of 16 worker threads)

The jobs (issue 7): sequential 1 MiB read and write at iodepth 4, 4 KiB
random read and write at iodepth 16, and the random read again over 4
connections (fio's ``numjobs=4``: each job opens its own connection).  Each
export is filled once before any job runs, so reads return data rather than
holes.  Each repetition runs every job against every server in turn, the
server order rotating between repetitions so that drift hits all alike; the
table shows medians, the ratio of each reference variant to each peer, and
the geometric mean of those ratios.  Peak RSS is VmHWM from /proc at the end.

A second section (``--no-rss-check`` skips it) starts fresh servers and
sends 32 MiB writes then reads over 4 connections at iodepth 2, the issue's
memory-bound scenario, and reports each server's peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Job:
    """One fio workload."""

    name: str
    rw: str
    bs: str
    iodepth: int
    numjobs: int = 1


JOBS = (
    Job("seq-read-1M-qd4", "read", "1m", 4),
    Job("seq-write-1M-qd4", "write", "1m", 4),
    Job("rand-read-4K-qd16", "randread", "4k", 16),
    Job("rand-write-4K-qd16", "randwrite", "4k", 16),
    Job("rand-read-4K-qd16-4conn", "randread", "4k", 16, numjobs=4),
)
RSS_JOBS = (
    Job("write-32M-qd2-4conn", "write", "32m", 2, numjobs=4),
    Job("read-32M-qd2-4conn", "read", "32m", 2, numjobs=4),
)


class BenchError(Exception):
    """Something the benchmark cannot work around: printed in one line, exit 1."""


# ------------------------------------------------------------------ servers


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

    @property
    def ours(self) -> bool:
        return self.peer == "reference"

    @property
    def program(self) -> str:
        return "python3" if self.ours else self.peer


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
    )
    if kind.ours:
        return reference_argv(options, python=args.python)
    return PEERS[kind.peer](options)


SERVERS = {
    kind.name: kind
    for kind in (
        ServerKind("reference", "reference", False),
        ServerKind("reference-file", "reference", True),
        ServerKind("qemu-nbd", "qemu-nbd", True, cache="writeback", aio="threads"),
        ServerKind("nbdkit", "nbdkit", False),
        ServerKind("candidate", "reference", False, "candidate"),
        ServerKind("candidate-file", "reference", True, "candidate"),
    )
}


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

    def peak_rss(self) -> int | None:
        """VmHWM in bytes (the kernel's high-water mark of resident memory)."""
        try:
            text = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None

    def cpu_seconds(self) -> float:
        """User and system CPU time of the server process (all its threads) so far."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return math.nan
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


# ---------------------------------------------------------------------- fio


def fio_argv(args: argparse.Namespace, server: Server, job: Job, *, timed: bool) -> list[str]:
    argv = [
        "fio",
        "--output-format=json",
        f"--name={job.name}",
        "--ioengine=nbd",
        f"--uri={server.uri}",
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        f"--numjobs={job.numjobs}",
        f"--size={args.size}",
        "--group_reporting",
        "--randrepeat=0",
    ]
    if timed:
        argv += [f"--runtime={args.runtime}", "--time_based"]
    return argv


@dataclass(frozen=True)
class FioRun:
    """One fio job's outcome: throughput, and the server's CPU time per request."""

    mib_s: float
    requests: int
    server_cpu: float  # seconds of CPU the server process used during the job

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.server_cpu / self.requests if self.requests else math.nan


def run_fio(args: argparse.Namespace, server: Server, job: Job, *, timed: bool = True) -> FioRun:
    """Run one fio job; its throughput in MiB/s (summed over connections) and server CPU."""
    argv = fio_argv(args, server, job, timed=timed)
    cpu_before = server.cpu_seconds()
    timeout = (args.runtime if timed else 0) + args.fio_timeout
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(
            f"fio {job.name} against {server.kind.name} took over {timeout}s"
        ) from None
    if done.returncode != 0:
        raise BenchError(
            f"fio {job.name} against {server.kind.name} failed ({done.returncode}):\n"
            + (done.stderr or done.stdout)[-2000:]
            + "\nserver log:\n"
            + server.log_tail()
        )
    start = done.stdout.find("{")
    try:
        report = json.loads(done.stdout[start:])
    except ValueError:
        raise BenchError(f"fio printed no JSON for {job.name}: {done.stdout[:500]}") from None
    cpu = server.cpu_seconds() - cpu_before
    direction = "write" if "write" in job.rw else "read"
    total = sum(j[direction]["bw_bytes"] for j in report["jobs"])
    requests = sum(j[direction]["total_ios"] for j in report["jobs"])
    errors = sum(j.get("error", 0) for j in report["jobs"])
    if errors:
        raise BenchError(f"fio {job.name} against {server.kind.name} reported errors")
    return FioRun(total / MiB, requests, cpu)


def prefill(args: argparse.Namespace, server: Server) -> None:
    """Write the whole export once (1 MiB sequential) so later reads hit data."""
    run_fio(args, server, Job("prefill", "write", "1m", 4), timed=False)


# ------------------------------------------------------------------ results


@dataclass
class Results:
    servers: list[str]
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # Server CPU microseconds per request, per job (less sensitive to load than MiB/s).
    cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    rss: dict[str, int | None] = field(default_factory=dict)
    big_rss: dict[str, int | None] = field(default_factory=dict)
    big_mibs: dict[str, dict[str, float]] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)  # 1-minute load average

    def median(self, server: str, job: str) -> float:
        return statistics.median(self.samples[server][job])

    def ratios(self) -> dict[str, dict[str, dict[str, float]]]:
        """ours -> peer -> job -> ratio."""
        ours = [s for s in self.servers if SERVERS[s].ours]
        peers = [s for s in self.servers if not SERVERS[s].ours]
        out: dict[str, dict[str, dict[str, float]]] = {}
        for us in ours:
            out[us] = {}
            for peer in peers:
                out[us][peer] = {
                    job.name: self.median(us, job.name) / self.median(peer, job.name)
                    for job in JOBS
                    if self.median(peer, job.name) > 0
                }
        return out


def geomean(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else float("nan")


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.0f}"


def print_table(results: Results, out: Callable[[str], None] = print) -> None:
    """Throughput per server, then ratios of each reference variant to each peer."""
    names = results.servers
    width = max(len(j.name) for j in JOBS) + 2
    col = max(10, *(len(n) + 2 for n in names))
    reps = len(results.samples[names[0]][JOBS[0].name])
    out(f"MiB/s, median of {reps}")
    out("job".ljust(width) + "".join(n.rjust(col) for n in names))
    for job in JOBS:
        cells = (f"{results.median(n, job.name):.1f}" for n in names)
        out(job.name.ljust(width) + "".join(c.rjust(col) for c in cells))
    out("peak RSS MiB".ljust(width) + "".join(_mib(results.rss.get(n)).rjust(col) for n in names))
    ratios = results.ratios()
    pairs = [(us, peer) for us in ratios for peer in ratios[us]]
    if pairs:
        rcol = max(len(f"{us}/{peer}") + 2 for us, peer in pairs)
        out("")
        out("ratio ours/peer")
        out("job".ljust(width) + "".join(f"{us}/{peer}".rjust(rcol) for us, peer in pairs))
        for job in JOBS:
            cells = (f"{ratios[us][peer].get(job.name, math.nan):.2f}x" for us, peer in pairs)
            out(job.name.ljust(width) + "".join(c.rjust(rcol) for c in cells))
        cells = (f"{geomean(list(ratios[us][peer].values())):.2f}x" for us, peer in pairs)
        out("geomean".ljust(width) + "".join(c.rjust(rcol) for c in cells))
    if results.big_rss:
        out("")
        out("32 MiB requests, 4 connections, iodepth 2 (fresh servers): MiB/s and peak RSS")
        out("job".ljust(width) + "".join(n.rjust(col) for n in names))
        for job in RSS_JOBS:
            cells = (f"{results.big_mibs.get(n, {}).get(job.name, math.nan):.1f}" for n in names)
            out(job.name.ljust(width) + "".join(c.rjust(col) for c in cells))
        cells = (_mib(results.big_rss.get(n)) for n in names)
        out("peak RSS MiB".ljust(width) + "".join(c.rjust(col) for c in cells))


# --------------------------------------------------------------------- main


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = text[-1:] if text[-1:] in units else ""
    try:
        return int(text[: len(text) - len(suffix)]) * units[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="repetitions (median taken); default 3")
    p.add_argument("--runtime", type=int, default=5, help="seconds per fio job; default 5")
    p.add_argument("--size", type=parse_size, default=256 * MiB, help="export size; default 256M")
    p.add_argument(
        "--servers",
        default="reference,reference-file,qemu-nbd,nbdkit",
        help="comma-separated subset of: " + ", ".join(SERVERS),
    )
    p.add_argument("--json", metavar="FILE", help="also save every sample and figure as JSON")
    p.add_argument("--no-rss-check", action="store_true", help="skip the 32 MiB-request section")
    p.add_argument("--image-dir", default="/dev/shm", help="where raw images go; default /dev/shm")
    p.add_argument("--python", default=sys.executable, help="interpreter for the reference server")
    p.add_argument(
        "--reference-root",
        type=Path,
        default=REPO,
        help="directory holding the reference_server package; default: this checkout",
    )
    p.add_argument(
        "--candidate",
        type=Path,
        metavar="DIR",
        help="also measure the reference_server package in DIR (servers candidate and "
        "candidate-file), alternating with the others in the same run",
    )
    p.add_argument("--fio-timeout", type=int, default=120, help="slack beyond runtime per fio run")
    return p


def check_tools(names: Sequence[str]) -> None:
    needed = {"fio"} | {SERVERS[n].program for n in names if not SERVERS[n].ours}
    missing = sorted(t for t in needed if shutil.which(t) is None)
    if missing:
        raise BenchError(
            "missing program(s): "
            + ", ".join(missing)
            + " (Debian: apt-get install "
            + " ".join(
                {"fio": "fio", "qemu-nbd": "qemu-utils", "nbdkit": "nbdkit"}[m] for m in missing
            )
            + ")"
        )
    probe = subprocess.run(
        ["fio", "--enghelp=nbd"], capture_output=True, text=True, timeout=30, check=False
    )
    if "uri" not in probe.stdout:
        raise BenchError("this fio has no nbd ioengine (built without libnbd?)")


def run(args: argparse.Namespace) -> Results:
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    if args.candidate:
        if not (args.candidate / "reference_server").is_dir():
            raise BenchError(f"--candidate {args.candidate} holds no reference_server package")
        twins = {"reference": "candidate", "reference-file": "candidate-file"}
        names += [twins[n] for n in names if n in twins and twins[n] not in names]
    elif any(SERVERS[n].root == "candidate" for n in names if n in SERVERS):
        raise BenchError("the candidate servers need --candidate DIR")
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        raise BenchError(f"unknown server(s) {unknown}; choose from {list(SERVERS)}")
    if not any(SERVERS[n].ours for n in names) or all(SERVERS[n].ours for n in names):
        print("note: ratios need a reference variant and a peer", file=sys.stderr)
    check_tools(names)
    results = Results(
        names,
        {n: {j.name: [] for j in JOBS} for n in names},
        {n: {j.name: [] for j in JOBS} for n in names},
    )
    results.load["start"] = os.getloadavg()[0]
    if results.load["start"] > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {results.load['start']:.1f} before starting: "
            "other work will skew the figures",
            file=sys.stderr,
        )
    with tempfile.TemporaryDirectory(prefix="nbd-bench-") as tmp:
        workdir = Path(tmp)
        with running(args, names, workdir, "main") as servers:
            for server in servers.values():
                print(f"prefilling {server.kind.name}: {' '.join(server.argv)}", flush=True)
                prefill(args, server)
            for rep in range(args.repeat):
                order = names[rep % len(names) :] + names[: rep % len(names)]
                for job in JOBS:
                    for name in order:
                        outcome = run_fio(args, servers[name], job)
                        results.samples[name][job.name].append(outcome.mib_s)
                        results.cpu[name][job.name].append(outcome.cpu_us_per_request)
                        print(
                            f"  rep {rep + 1} {job.name:26} {name:15} {outcome.mib_s:9.1f} MiB/s"
                            f" {outcome.cpu_us_per_request:9.1f} us CPU/request",
                            flush=True,
                        )
            results.rss = {name: s.peak_rss() for name, s in servers.items()}
        if not args.no_rss_check:
            for name in names:
                with running(args, [name], workdir, "rss") as servers:
                    server = servers[name]
                    results.big_mibs[name] = {
                        job.name: run_fio(args, server, job).mib_s for job in RSS_JOBS
                    }
                    results.big_rss[name] = server.peak_rss()
                    print(f"  32M {name:15} peak RSS {_mib(results.big_rss[name])} MiB", flush=True)
    results.load["end"] = os.getloadavg()[0]
    return results


def save_json(args: argparse.Namespace, results: Results, path: str) -> None:
    ratios = results.ratios()
    data = {
        "config": {
            "repeat": args.repeat,
            "runtime": args.runtime,
            "size": args.size,
            "servers": {
                n: " ".join(server_argv(SERVERS[n], args, "SOCK", "IMAGE")) for n in results.servers
            },
            "jobs": [vars(j) for j in (*JOBS, *RSS_JOBS)],
            "fio": subprocess.run(
                ["fio", "--version"], capture_output=True, text=True, timeout=30, check=False
            ).stdout.strip(),
        },
        "samples_mib_s": results.samples,
        "median_mib_s": {
            n: {j.name: results.median(n, j.name) for j in JOBS} for n in results.servers
        },
        "ratios": ratios,
        "geomean": {
            us: {peer: geomean(list(r.values())) for peer, r in per.items()}
            for us, per in ratios.items()
        },
        "peak_rss_bytes": results.rss,
        "load_average": results.load,
        "big_requests": {"mib_s": results.big_mibs, "peak_rss_bytes": results.big_rss},
    }
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeat < 1 or args.runtime < 1:
        print("fio_bench: --repeat and --runtime must be at least 1", file=sys.stderr)
        return 2
    try:
        results = run(args)
    except BenchError as exc:
        print(f"fio_bench: {exc}", file=sys.stderr)
        return 1
    print()
    print_table(results)
    print(
        f"\nload average {results.load['start']:.1f} at start, {results.load['end']:.1f} at end "
        f"({os.cpu_count()} CPUs; fio and the servers share them)"
    )
    if args.json:
        save_json(args, results, args.json)
        print(f"\nsaved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
