"""fio's ``nbd`` ioengine (libnbd underneath) as the benchmarks drive it: jobs and their outcome."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from bench_servers import SERVERS, BenchError, MiB, Server


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


@dataclass(frozen=True)
class FioRun:
    """One fio job's outcome: throughput, and the server's CPU time per request."""

    mib_s: float
    requests: int
    server_cpu: float  # seconds of CPU the server process used during the job

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.server_cpu / self.requests if self.requests else math.nan


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
