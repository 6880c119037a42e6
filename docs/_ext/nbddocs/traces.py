"""The protocol tour's captured exchanges still match the server (capture.py --check)."""

from __future__ import annotations

import subprocess
import sys

from sphinx.application import Sphinx
from sphinx.util import logging

from .common import (
    DOCS,
    REPO,
    TRACE_CHECK_TIMEOUT,
)

logger = logging.getLogger(__name__)


def check_traces(app: Sphinx) -> None:
    """``capture.py --check``: the tour's exchanges must still be what the server does."""
    script = DOCS / "traces" / "capture.py"
    try:
        result = subprocess.run(
            [sys.executable, str(script), "--check"],
            capture_output=True,
            text=True,
            timeout=TRACE_CHECK_TIMEOUT,
            check=False,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        logger.warning("docs/traces/capture.py --check did not finish in %ss", TRACE_CHECK_TIMEOUT)
        return
    if result.returncode:
        logger.warning(
            "the captured protocol exchanges differ from the reference server's behaviour "
            "(docs/traces/capture.py --check):\n%s%s",
            result.stdout,
            result.stderr,
        )
    else:
        logger.info(result.stdout.strip())
