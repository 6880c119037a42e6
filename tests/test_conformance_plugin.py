"""The suite's pytest plugin end to end: verdicts, strictness, deviations, xdist, JSON.

Runs pytest in a subprocess on a handful of toy checks that need no server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

TOY_CHECKS = """
import pytest
from conformance.spec import MUST, SHOULD, expect_equal, spec, unsupported

@spec("Sec / A", MUST)
def test_must_pass():
    expect_equal(1, 1, "one")

@spec("Sec / A", MUST)
def test_must_fail():
    expect_equal(1, 2, "size")

@spec("Sec / B", SHOULD)
def test_should_fail():
    expect_equal("EINVAL", "EPERM", "error")

@spec("Sec / B", SHOULD)
def test_unsupported():
    unsupported("no trim")

@pytest.mark.writes
@spec("Sec / C", MUST)
def test_writes():
    pass

@spec("Values / Transmission phase / Request types", SHOULD)
def test_write_zeroes_gets_eperm():
    expect_equal("EINVAL", "EPERM", "write-zeroes on a read-only export")
"""


def run_suite(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    (tmp_path / "test_toy.py").write_text(TOY_CHECKS)
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "conformance.plugin",
            "-p",
            "no:cacheprovider",
            str(tmp_path / "test_toy.py"),
            f"--report={report}",
            *args,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    outcomes = {c["id"]: c for c in json.loads(report.read_text())["checks"]}
    return result.returncode, outcomes, result.stdout


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_verdicts(tmp_path, workers):
    status, checks, stdout = run_suite(tmp_path, "--nbd-server=qemu-nbd", *workers)
    assert status == 1
    assert {name: c["outcome"] for name, c in checks.items()} == {
        "test_must_pass": "passed",
        "test_must_fail": "failed",
        "test_should_fail": "warning",
        "test_unsupported": "unsupported",
        "test_writes": "passed",
        "test_write_zeroes_gets_eperm": "xfailed",  # a recorded qemu-nbd deviation
    }
    assert checks["test_must_fail"]["message"].endswith("size: expected 2, actual 1")
    assert (
        checks["test_should_fail"]["message"] == "SHOULD: error: expected 'EPERM', actual 'EINVAL'"
    )
    assert "qemu-nbd" in checks["test_write_zeroes_gets_eperm"]["message"]
    assert checks["test_must_fail"]["section"] == "Sec / A"
    assert "WARNING test_should_fail [Sec / B]" in stdout
    total = [line for line in stdout.splitlines() if line.startswith("TOTAL")]
    assert total[0].split() == ["TOTAL", "6", "2", "1", "1", "1", "1", "0", "0"]


def test_strict_turns_should_failures_into_failures(tmp_path):
    _, checks, _ = run_suite(tmp_path, "--nbd-strict")
    assert checks["test_should_fail"]["outcome"] == "failed"
    assert checks["test_write_zeroes_gets_eperm"]["outcome"] == "failed"  # reference: no deviation


def test_writes_are_not_run_against_a_server_the_suite_did_not_start(tmp_path):
    _status, checks, stdout = run_suite(tmp_path, "--uri", "nbd+unix:///?socket=/nonexistent")
    assert checks["test_writes"]["outcome"] == "not-run"
    assert "--allow-writes" in checks["test_writes"]["message"]
    assert "NOT RUN test_writes [Sec / C]: writes" in stdout
    assert "not run: 1 (they write to the export: --allow-writes lets them)" in stdout
    _, checks, _ = run_suite(tmp_path, "--uri", "nbd+unix:///?socket=/x", "--allow-writes")
    assert checks["test_writes"]["outcome"] == "passed"


TOY_PROFILE = """
from conformance.servers import Deviation, Profile

class ToyServer(Profile):
    name = "toy"
    deviations = (Deviation("test_must_fail", "Sec / A", "the toy server gets sizes wrong"),)

def pytest_nbd_profiles():
    return [ToyServer]
"""


def test_another_project_registers_its_own_profile(tmp_path):
    """conformance/hookspecs.py: a conftest adds a profile with its own deviations."""
    (tmp_path / "conftest.py").write_text(TOY_PROFILE)
    _, checks, stdout = run_suite(tmp_path, "--nbd-server=toy")
    assert checks["test_must_fail"]["outcome"] == "xfailed"
    assert "known toy deviation" in checks["test_must_fail"]["message"]
    assert "NBD conformance: --nbd-server=toy" in stdout


def test_an_unknown_profile_is_a_usage_error(tmp_path):
    (tmp_path / "test_toy.py").write_text(TOY_CHECKS)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conformance.plugin", "--nbd-server=nope"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 4, result.stdout + result.stderr
    assert "--nbd-server=nope: no such profile (known: nbd-server, nbdkit, qemu-nbd" in (
        result.stderr
    )
