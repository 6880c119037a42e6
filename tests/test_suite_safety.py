"""The suite is safe and truthful toward the server it is pointed at.

Run as a user would (``pytest conformance --uri ...`` or ``--server-cmd ...``
in a subprocess), against servers the tests start themselves:

- a writable export given as ``--uri`` without ``--allow-writes`` keeps every
  byte, even with ``--allow-disruptive``;
- disruptive checks are left out against ``--uri`` unless allowed, and the
  report says how many and why;
- a server that crashes on one request ends a ``--uri`` run at once, with the
  check that killed it named and the rest not run; started per check
  (``--server-cmd``), it fails just that check with the signal and its log;
- a server that answers nothing ends the run within seconds, not one timeout
  per check.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conformance.servers.peers import ServeOptions, reference_argv
from conformance.servers.process import ServerProcess
from tests.suite_runs import run_pytest

REPO = Path(__file__).resolve().parents[1]
FAULTY = REPO / "tests" / "broken_servers" / "faulty.py"
RUN_TIMEOUT = 150
MiB = 1 << 20
# The historic request magic that test_request_with_bad_magic_is_not_honoured
# sends, and on which tests/broken_servers/faulty.py aborts.
BAD_MAGIC = "12560953"
KILLER = "test_request_with_bad_magic_is_not_honoured"
HANDSHAKE = "conformance/test_handshake.py"
#: The CVE reproducers, every one of them disruptive.
CVES = sorted(str(p.relative_to(REPO)) for p in (REPO / "conformance").glob("test_cves_*.py"))


@dataclass
class Run:
    returncode: int
    report: dict[str, Any]
    output: str

    def outcomes(self) -> dict[str, str]:
        return {c["id"]: c["outcome"] for c in self.report["checks"]}

    def check(self, check_id: str) -> dict[str, Any]:
        return next(c for c in self.report["checks"] if c["id"] == check_id)


def run_suite(tmp_path: Path, *args: str, workers: int | None = 2) -> Run:
    report = tmp_path / "report.json"
    argv = ["-q", "-p", "no:cacheprovider", f"--report={report}"]
    if workers:
        argv += ["-n", str(workers)]
    returncode, document, output = run_pytest([*argv, *args], report, RUN_TIMEOUT)
    return Run(returncode, document, output)


@contextlib.contextmanager
def running(argv: list[str], socket_path: Path, log: Path) -> Any:
    """A server process listening on SOCKET_PATH, stopped by PID at the end."""
    server = ServerProcess(argv, log_path=log, cwd=REPO)
    try:
        server.wait_listening(socket_path, 20)
        yield server.process
    finally:
        server.stop()


def reference(sock: Path, **options: Any) -> list[str]:
    """The reference server on SOCK, persistent, without a connection limit."""
    return reference_argv(ServeOptions(socket=sock, persistent=True, shared=0, **options))


def uri(socket_path: Path) -> str:
    return f"nbd+unix:///?socket={socket_path}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- no write without consent


def test_whole_suite_against_a_writable_uri_changes_no_byte(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(64 * MiB))
    before = sha256(image)
    sock = tmp_path / "nbd.sock"
    with running(reference(sock, image=image), sock, tmp_path / "server.log"):
        run = run_suite(tmp_path, "conformance", "--uri", uri(sock), "--allow-disruptive")
    assert sha256(image) == before, "the export changed without --allow-writes"
    outcomes = run.outcomes()
    failed = {c: o for c, o in outcomes.items() if o in ("failed", "error")}
    # A check that writes without its marker fails (UnmarkedWrite): none may.
    assert not failed, run.output[-6000:]
    assert run.returncode == 0, run.output[-4000:]
    not_run = run.report["not_run"]
    assert not_run.get("writes", 0) >= 50, not_run
    assert "disruptive" not in not_run, not_run
    assert sum(o == "passed" for o in outcomes.values()) >= 100, run.output[-3000:]


def test_disruptive_checks_are_left_out_against_a_uri(tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    with running(reference(sock, memory="64M"), sock, tmp_path / "server.log"):
        run = run_suite(tmp_path, HANDSHAKE, *CVES, "--uri", uri(sock))
    assert run.returncode == 0, run.output[-4000:]
    assert run.check(KILLER)["outcome"] == "not-run"
    assert run.report["not_run"]["disruptive"] >= 20, run.report["not_run"]
    assert "--allow-disruptive lets them" in run.output, run.output[-3000:]


# ---------------------------------------------------------- a server that dies or wedges


def test_uri_server_that_crashes_ends_the_run_naming_the_check(tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    server = [sys.executable, str(FAULTY), "--abort-on", BAD_MAGIC, "-k", str(sock)]
    with running([*server, "-t", "-e", "0", "--memory", "64M"], sock, tmp_path / "faulty.log"):
        # In file order, one at a time, so that "the rest" is well defined.
        run = run_suite(tmp_path, HANDSHAKE, "--uri", uri(sock), "--allow-disruptive", workers=None)
    assert run.returncode == 1, run.output[-4000:]
    killer = run.check(KILLER)
    assert killer["outcome"] in ("failed", "error"), killer
    assert "stopped answering during" in killer["message"], killer
    assert KILLER in run.report["target_gone"], run.report["target_gone"]
    outcomes = run.outcomes()
    left_out = {c for c, o in outcomes.items() if o == "not-run"}
    assert left_out, "the killer is the last check of the file: nothing to show"
    assert run.report["not_run"] == {"server gone": len(left_out)}
    assert "THE SERVER UNDER TEST IS GONE" in run.output
    ran_before = {o for c, o in outcomes.items() if c not in left_out and c != KILLER}
    assert ran_before <= {"passed", "unsupported"}, run.output[-4000:]


def test_server_started_per_check_that_crashes_fails_that_check(tmp_path: Path) -> None:
    template = (
        f"{sys.executable} {FAULTY} --abort-on {BAD_MAGIC} -k {{socket}} -t -e {{shared}} "
        "-x {export} --memory {size} {read_only:-r}"
    )
    run = run_suite(tmp_path, HANDSHAKE, "--server-cmd", template)
    assert run.returncode == 1, run.output[-4000:]
    killer = run.check(KILLER)
    assert killer["outcome"] == "failed", (killer["message"], run.output[-3000:])
    assert "the server crashed (signal 6, SIGABRT) during the check" in killer["message"]
    assert f"faulty: aborting on the bytes {BAD_MAGIC}" in killer["message"], killer
    others = {c: o for c, o in run.outcomes().items() if c != KILLER}
    assert set(others.values()) <= {"passed", "unsupported"}, run.output[-4000:]


def test_uri_server_that_answers_nothing_ends_the_run_quickly(tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    silent = [sys.executable, str(FAULTY), "--silent", "-k", str(sock)]
    with running(silent, sock, tmp_path / "faulty.log"):
        run = run_suite(tmp_path, "conformance", "--uri", uri(sock))
    assert run.returncode == 1, run.output[-4000:]
    gone = run.report["target_gone"]
    assert "does not negotiate" in gone, gone
    outcomes = list(run.outcomes().values())
    # The checks that were running when it was found out fail; all others are not run.
    assert outcomes.count("not-run") >= len(outcomes) - 4, run.output[-4000:]
    assert run.report["summary"]["failed"] <= 4
