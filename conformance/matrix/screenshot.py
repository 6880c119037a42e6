"""A picture of the matrix page, painted by headless Chromium, for the docs.

Debian's ``chromium`` package (installed by ``./bootstrap`` as root); the
page is loaded from a file URL with a fragment choosing the view (by
default the failures only), so the picture shows what a reader would see.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

#: Seconds Chromium may take to paint the page.
TIMEOUT = 120


class NoChromium(RuntimeError):
    """Chromium is not installed, or failed to paint the page."""


def take(page: Path, png: Path, fragment: str = "failures", size: str = "1400,1000") -> None:
    """Paint PAGE (with #FRAGMENT) into PNG at SIZE (width,height in pixels)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        raise NoChromium("Debian's chromium is not installed (./bootstrap installs it as root)")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="matrix-chromium-") as profile:
        try:
            done = subprocess.run(
                [
                    chromium,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--hide-scrollbars",
                    f"--user-data-dir={profile}",
                    f"--window-size={size}",
                    f"--screenshot={png.resolve()}",
                    f"{page.resolve().as_uri()}#{fragment}",
                ],
                capture_output=True,
                timeout=TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise NoChromium(f"chromium did not paint {page} within {TIMEOUT} s") from err
    if done.returncode != 0 or not png.exists():
        tail = done.stderr.decode(errors="replace")[-1000:]
        raise NoChromium(f"chromium failed (exit status {done.returncode}): {tail}")
