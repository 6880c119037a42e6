#!/usr/bin/env python3
"""Wall and CPU time of the conformance suite against the reference server, serial and with xdist.

    python bench/suite_time.py [--only serial|parallel] [--timeout 600] [--json FILE]
                               [-- EXTRA PYTEST ARGS]

Runs ``python -m pytest conformance --nbd-server=reference -q`` once as is and
once with ``-n auto`` (issue 11's goal: the whole suite under 30 s on 2 cores),
from the repository root, with the environment of ``tox -e reference``
(PYTHONASYNCIODEBUG=0).  Each run is its own process group, ended by its id
if it overruns the timeout.  The exit status is 1 if either run failed or
timed out, so a regression in the suite shows up here too.

Beside the wall time, the CPU time (user + system) of the run's whole process
tree: pytest, its xdist workers and every server they started and reaped.  On
a machine others use, the wall time measures them too; the CPU time hardly
does, and divided by the cores it bounds what an idle machine can do.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: the process harness lives in conformance/
    sys.path.insert(1, str(REPO))

from conformance.servers.process import end_process_tree  # noqa: E402

KILL_GRACE = 10.0


def pytest_argv(workers: str | None, extra: Sequence[str]) -> list[str]:
    argv = [sys.executable, "-m", "pytest", "conformance", "--nbd-server=reference", "-q"]
    if workers:
        argv += ["-n", workers]
    return argv + list(extra)


def _children_cpu() -> float:
    """CPU seconds (user + system) of every descendant reaped so far, with theirs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(argv: list[str], timeout: float) -> tuple[float, float, int | None, str]:
    """Run ``argv``; return (seconds, CPU seconds, exit status or None on timeout, last line).

    The CPU time counts each process once its parent has reaped it, as every
    process of the suite is (the servers by their fork server or worker, the
    workers by pytest); runs are one at a time, so the difference is this run's.
    """
    env = dict(os.environ, PYTHONASYNCIODEBUG="0")
    cpu_before = _children_cpu()
    start = time.monotonic()
    process = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group: a timeout ends pytest and its workers
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        status: int | None = process.returncode
    except subprocess.TimeoutExpired:
        end_process_tree(process, KILL_GRACE)
        output, _ = process.communicate(timeout=KILL_GRACE)
        status = None
    elapsed = time.monotonic() - start
    cpu = _children_cpu() - cpu_before
    lines = [line for line in (output or "").splitlines() if line.strip()]
    return elapsed, cpu, status, lines[-1] if lines else ""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timeout", type=float, default=600, help="seconds per run; default 600")
    p.add_argument("--workers", default="auto", help="value for -n in the parallel run")
    p.add_argument("--json", metavar="FILE", help="also save the figures as JSON")
    p.add_argument(
        "--only",
        choices=("serial", "parallel"),
        help="run only the serial or only the -n run",
    )
    p.add_argument("extra", nargs="*", help="more pytest arguments (after --)")
    args = p.parse_args(argv)
    if not (REPO / "conformance").is_dir():
        print(f"suite_time: no conformance/ directory in {REPO}", file=sys.stderr)
        return 1
    results = {}
    failed = False
    runs = [("serial", None), (f"-n {args.workers}", args.workers)]
    if args.only:
        runs = [runs[0] if args.only == "serial" else runs[1]]
    for label, workers in runs:
        command = pytest_argv(workers, args.extra)
        print(f"{label}: {' '.join(command[1:])}", flush=True)
        elapsed, cpu, status, summary = timed_run(command, args.timeout)
        verdict = "timed out" if status is None else f"exit {status}"
        print(f"  {elapsed:7.1f} s wall  {cpu:7.1f} s CPU  {verdict}  {summary}", flush=True)
        results[label] = {
            "seconds": elapsed,
            "cpu_seconds": cpu,
            "status": status,
            "summary": summary,
        }
        failed |= status != 0
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
