#!/usr/bin/env python3
"""Throughput of the reference server against qemu-nbd and nbdkit, measured with fio.

    python bench/fio_bench.py [--repeat 3] [--runtime 5] [--size 256M] [--json FILE]
                              [--servers LIST] [--no-rss-check] [--no-scaling]

The servers and how each is started: ``bench/bench_servers.py`` (the
reference server on memory and on a raw file in /dev/shm, each also on
uvloop when it is installed, qemu-nbd, nbdkit's memory plugin).  Each is
driven by fio's ``nbd`` ioengine (libnbd underneath, so structured replies
are negotiated as a real client would).

The jobs (``bench/fio_jobs.py``): sequential 1 MiB read and write at
iodepth 4, 4 KiB random read and write at iodepth 16, and the random read
again over 4 connections (fio's ``numjobs=4``: each job opens its own
connection).  Each export is filled once before any job runs, so reads
return data rather than holes.  Each repetition runs every job against every
server in turn, the server order rotating between repetitions so that drift
hits all alike; the table shows medians, the ratio of each reference variant
to each peer, and the geometric mean of those ratios.  Beside the MiB/s, the
server's CPU time per request (user + system, from /proc): less sensitive to
other load on the machine than throughput, and what a faster server saves.
Peak RSS is VmHWM from /proc at the end.

A second section (``--no-rss-check`` skips it) starts fresh servers and
sends 32 MiB writes then reads over 4 connections at iodepth 2, the
memory-bound scenario, and reports each server's peak RSS, and beside it
the peak of RssAnon + RssFile sampled every 5 ms: resident memory without
RssShmem, the mapped pages of a tmpfs image (the reference server receives
writes into a mapping of its file on tmpfs: those pages are the file's own
page cache, not memory held for requests).  The last
(``--no-scaling`` skips it) is the scaling table of ``bench/scaling.py``:
throughput at 1, 4 and 16 connections, memory per idle connection, time to
first byte under load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import scaling
from bench_servers import REPO, SERVERS, BenchError, MiB, has_uvloop, running, server_argv
from fio_jobs import JOBS, RSS_JOBS, check_tools, prefill, run_fio

__all__ = ["Results", "main", "print_table", "run"]


# ------------------------------------------------------------------ results


@dataclass
class Results:
    servers: list[str]
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # Server CPU microseconds per request, per job (less sensitive to load than MiB/s).
    cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    rss: dict[str, int | None] = field(default_factory=dict)
    big_rss: dict[str, int | None] = field(default_factory=dict)
    # Sampled peak of RssAnon + RssFile: without the mapped pages of a tmpfs image.
    big_private: dict[str, int | None] = field(default_factory=dict)
    big_mibs: dict[str, dict[str, float]] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)  # 1-minute load average
    scaling: scaling.Scaling | None = None

    def median(self, server: str, job: str) -> float:
        return statistics.median(self.samples[server][job])

    def median_cpu(self, server: str, job: str) -> float:
        return statistics.median(self.cpu[server][job])

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
    out("")
    out(f"server CPU microseconds per request (user + system), median of {reps}")
    out("job".ljust(width) + "".join(n.rjust(col) for n in names))
    for job in JOBS:
        cells = (f"{results.median_cpu(n, job.name):.1f}" for n in names)
        out(job.name.ljust(width) + "".join(c.rjust(col) for c in cells))
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
        cells = (_mib(results.big_private.get(n)) for n in names)
        out("  without tmpfs pages".ljust(width) + "".join(c.rjust(col) for c in cells))
    if results.scaling is not None:
        out("")
        scaling.print_table(results.scaling, names, out)


# --------------------------------------------------------------------- main


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = text[-1:] if text[-1:] in units else ""
    try:
        return int(text[: len(text) - len(suffix)]) * units[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None


DEFAULT_SERVERS = "reference,reference-file,qemu-nbd,nbdkit"
UVLOOP_TWINS = {"reference": "reference-uvloop", "reference-file": "reference-file-uvloop"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="repetitions (median taken); default 3")
    p.add_argument("--runtime", type=int, default=5, help="seconds per fio job; default 5")
    p.add_argument("--size", type=parse_size, default=256 * MiB, help="export size; default 256M")
    p.add_argument(
        "--servers",
        default=DEFAULT_SERVERS,
        help="comma-separated subset of: "
        + ", ".join(SERVERS)
        + f" (default: {DEFAULT_SERVERS}, and the -uvloop variants when uvloop is installed)",
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
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    p.add_argument(
        "--idle", type=int, default=1000, help="idle connections in the scaling table (1000)"
    )
    p.add_argument("--probes", type=int, default=20, help="new connections timed under load (20)")
    return p


def run(args: argparse.Namespace) -> Results:
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    if args.servers == DEFAULT_SERVERS:
        if has_uvloop(args.python):
            names[2:2] = [UVLOOP_TWINS[n] for n in names if n in UVLOOP_TWINS]
        else:
            print(
                f"note: {args.python} cannot import uvloop: the reference server is measured "
                "on asyncio's loop only (pip install uvloop, or tox -e bench, adds it)",
                file=sys.stderr,
            )
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
    if not args.no_scaling:
        scaling.check_ready(args.idle)
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
                    with server.sampling_private_peak() as private:
                        results.big_mibs[name] = {
                            job.name: run_fio(args, server, job).mib_s for job in RSS_JOBS
                        }
                    results.big_rss[name] = server.peak_rss()
                    results.big_private[name] = private[0] if private else None
                    print(
                        f"  32M {name:15} peak RSS {_mib(results.big_rss[name])} MiB"
                        f" ({_mib(results.big_private[name])} MiB without tmpfs pages)",
                        flush=True,
                    )
        if not args.no_scaling:
            results.scaling = scaling.measure(
                args, names, workdir, lambda line: print(line, flush=True)
            )
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
        "server_cpu_us_per_request": results.cpu,
        "peak_rss_bytes": results.rss,
        "load_average": results.load,
        "big_requests": {
            "mib_s": results.big_mibs,
            "peak_rss_bytes": results.big_rss,
            "peak_private_rss_bytes_sampled": results.big_private,
        },
    }
    if results.scaling is not None:
        data["scaling"] = {
            "rand_read_4k_mib_s_by_connections": results.scaling.mib_s,
            "idle_rss_bytes_before_after_opened": results.scaling.idle_rss,
            "idle_errors": results.scaling.idle_errors,
            "first_byte_under_load_s": results.scaling.ttfb,
        }
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeat < 1 or args.runtime < 1 or args.idle < 0 or args.probes < 1:
        print(
            "fio_bench: --repeat, --runtime and --probes must be at least 1, --idle at least 0",
            file=sys.stderr,
        )
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
