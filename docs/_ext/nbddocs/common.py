"""Paths and constants every part of the extension shares, and docutils node helpers."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from docutils import nodes
from sphinx.util import logging

logger = logging.getLogger(__name__)


DOCS = Path(__file__).resolve().parents[2]
REPO = DOCS.parent
SPEC = DOCS / "spec" / "proto.md"
EXT_SPEC = DOCS / "spec" / "proto-extension-ext-header.md"
SERVER_PAGE = "tools/nbd-reference-server"
SUITE_PAGE = "tools/nbd-conformance"
# Pages whose content comes from outside docs/: re-read on every build.
DYNAMIC_PAGES = ("traceability", "findings")
TRACE_CHECK_TIMEOUT = 300
# Options the nbd-conformance page documents that pytest (--strict) and
# pytest-xdist (-n) own, not the suite's plugin.
PYTEST_OWN_OPTIONS = {"--strict", "-n"}


def _para(*children: nodes.Node | str) -> nodes.paragraph:
    para = nodes.paragraph()
    for child in children:
        para += nodes.Text(child) if isinstance(child, str) else child
    return para


def _table(headers: list[str], rows: Iterable[list[nodes.Node]], widths: list[int]) -> nodes.table:
    table = nodes.table()
    group = nodes.tgroup(cols=len(headers))
    table += group
    for width in widths:
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    group += head
    row = nodes.row()
    for header in headers:
        row += nodes.entry("", _para(header))
    head += row
    body = nodes.tbody()
    group += body
    for cells in rows:
        row = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            entry += cell
            row += entry
        body += row
    return table
