"""Sphinx configuration: HTML and man pages, Sphinx built-ins plus one local extension.

``tox -e docs`` builds with ``-W --keep-going``: every warning fails the build,
including those of ``_ext/nbddocs/`` (undocumented options, traces that no
longer match the reference server, checks citing headings that do not exist).
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

project = "nbd-toolkit"
author = "the nbd-toolkit authors"
copyright = "the nbd-toolkit authors"
release = version = "0.1.0"

extensions = ["nbddocs", "nbdmatrix"]
exclude_patterns = ["_build", "traces/README.rst", "spec"]
templates_path: list[str] = []
root_doc = "index"
highlight_language = "none"
nitpicky = True

html_theme = "alabaster"
html_title = "nbd-toolkit"
html_static_path: list[str] = []

# Section 1: commands.  (source, name, description, authors, section)
man_pages = [
    (
        "tools/nbd-reference-server",
        "nbd-reference-server",
        "a reference NBD server with qemu-nbd's command line",
        [author],
        1,
    ),
    (
        "tools/nbd-conformance",
        "nbd-conformance",
        "check an NBD server against the protocol specification",
        [author],
        1,
    ),
]
# Links to other pages of this manual mean nothing in a man page: show their text only.
man_show_urls = False
