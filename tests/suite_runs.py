"""Running the conformance suite as a user would: ``python -m pytest ...`` in a subprocess.

The self-tests (test_suite_can_fail.py, test_suite_safety.py) judge the suite
by what a user sees: its exit status, its output and its JSON report.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_pytest(argv: list[str], report: Path, timeout: float) -> tuple[int, dict[str, Any], str]:
    """``python -m pytest ARGV`` from the repository root: (exit status, report, output).

    The run is its own process group (pytest and its xdist workers), killed
    whole if it overruns TIMEOUT, which fails the calling test.
    """
    # The outer pytest (maybe an xdist worker) must not leak into the inner one.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=10)
        pytest.fail(f"the suite ran longer than {timeout}s:\n{output[-4000:]}")
    assert report.exists(), output[-4000:]
    return proc.returncode, json.loads(report.read_text()), output
