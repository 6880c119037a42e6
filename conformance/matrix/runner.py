"""Run the suite against several servers, one after the other, for the matrix.

Each target is one ``python -m conformance.cli`` process (the same entry
point as ``nbd-conformance``) writing its JSON report; a target whose run
fails still gives a column (a failing server is the point).  The server's
version is asked of the installed tool when the run starts and written into
the report, so that reports assembled later on another machine keep it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from conformance.servers import PROFILES

#: Seconds one target's whole run may take before it is stopped.
RUN_TIMEOUT = 1800

#: How to ask each built-in profile's program for its version.
VERSION_COMMANDS: dict[str, list[str]] = {
    "reference": [sys.executable, "-m", "reference_server", "--version"],
    "qemu-nbd": ["qemu-nbd", "--version"],
    "nbdkit": ["nbdkit", "--version"],
    "nbd-server": ["nbd-server", "-V"],
}


@dataclasses.dataclass(frozen=True)
class Target:
    """One column of the matrix to be produced by a run of the suite."""

    key: str
    options: tuple[str, ...]
    version_command: tuple[str, ...] = ()
    #: How the server is started, for people: the profile's command line, the template, the URI.
    configuration: str = ""


def profile_configuration(name: str) -> str:
    """The first line of the profile's docstring: its command line (``qemu-nbd -k SOCK ...``)."""
    doc = (PROFILES[name].__doc__ or "").strip().splitlines()
    return doc[0].replace("``", "").strip().rstrip(".") if doc else ""


def installed_profiles(progress: Callable[[str], None] | None = None) -> list[str]:
    """The built-in profiles whose program is on PATH (the reference server always is)."""
    names = []
    for name in PROFILES:
        command = VERSION_COMMANDS.get(name)
        if name == "reference" or (command and shutil.which(command[0])):
            names.append(name)
        elif progress is not None:
            progress(f"matrix: {name} is not installed: no column for it")
    return names


def _unique(key: str, taken: set[str]) -> str:
    candidate, n = key, 2
    while candidate in taken:
        candidate, n = f"{key}-{n}", n + 1
    taken.add(candidate)
    return candidate


def targets(
    profiles: Sequence[str], server_cmds: Sequence[str], uris: Sequence[str]
) -> list[Target]:
    """The targets in column order: built-in profiles, then command templates, then URIs."""
    taken: set[str] = set()
    result = [
        Target(
            _unique(p, taken),
            (f"--nbd-server={p}",),
            tuple(VERSION_COMMANDS.get(p, ())),
            profile_configuration(p),
        )
        for p in profiles
    ]
    for template in server_cmds:
        program = os.path.basename(template.split()[0]) if template.split() else "command"
        result.append(Target(_unique(program, taken), ("--server-cmd", template), (), template))
    for uri in uris:
        result.append(Target(_unique("uri", taken), ("--uri", uri), (), uri))
    return result


def parse_version(output: str) -> str:
    """The version line of a program's ``--version`` output, tidied.

    "This is nbd-server version 3.24" becomes "nbd-server 3.24"; otherwise
    the first non-empty line is kept as the program printed it.
    """
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines:
        return ""
    match = re.fullmatch(r"This is (\S+) version (\S+)", lines[0])
    return f"{match[1]} {match[2]}" if match else lines[0]


def ask_version(command: Sequence[str]) -> str:
    if not command:
        return ""
    try:
        done = subprocess.run(
            list(command), capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return parse_version(done.stdout or done.stderr)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the run and whatever it started (its own process group), by PID."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclasses.dataclass
class RunResult:
    target: Target
    report_path: Path
    exitstatus: int
    seconds: float
    version: str


def run_target(
    target: Target,
    out_dir: Path,
    pytest_args: Sequence[str] = (),
    timeout: float = RUN_TIMEOUT,
) -> RunResult:
    """Run the suite against TARGET; its report is ``OUT_DIR/KEY.json``, its log ``KEY.log``.

    The report always exists afterwards: when the run wrote none (a crash,
    a usage error) a report with no checks and the reason stands in for it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / f"{target.key}.json"
    log_path = out_dir / f"{target.key}.log"
    report_path.unlink(missing_ok=True)
    version = ask_version(target.version_command)
    argv = [
        sys.executable,
        "-m",
        "conformance.cli",
        *target.options,
        f"--report={report_path}",
        *pytest_args,
    ]
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            status = -1
        finally:
            if proc.poll() is None:
                _stop(proc)
    seconds = time.monotonic() - started
    report: dict[str, Any]
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        reason = "timed out" if status == -1 else f"exit status {status}"
        report = {
            "profile": target.key,
            "target": " ".join(target.options),
            "exitstatus": status,
            "error": f"the run wrote no report ({reason}); see {log_path}",
            "checks": [],
        }
    if version and not report.get("version"):
        report["version"] = version
    if target.configuration and not report.get("configuration"):
        report["configuration"] = target.configuration
    report.setdefault("duration", round(seconds, 1))
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return RunResult(target, report_path, status, seconds, version)


def run_all(
    all_targets: Sequence[Target],
    out_dir: Path,
    pytest_args: Sequence[str] = (),
    progress: Callable[[str], None] = lambda line: print(line, flush=True),
) -> list[RunResult]:
    """Run every target in turn (each run already uses the cores through ``-n``)."""
    results = []
    for target in all_targets:
        progress(f"matrix: running the suite against {target.key} ({' '.join(target.options)})")
        result = run_target(target, out_dir, pytest_args)
        progress(
            f"matrix: {target.key}: exit status {result.exitstatus} in {result.seconds:.0f} s, "
            f"report {result.report_path}"
        )
        results.append(result)
    return results
