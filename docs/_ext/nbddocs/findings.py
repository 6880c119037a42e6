"""The findings page, rendered from the reports under reports/ or docs/matrix/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from .common import (
    REPO,
    _para,
    _table,
)

logger = logging.getLogger(__name__)


def load_reports(directory: Path) -> list[tuple[Path, dict[str, Any] | None, str]]:
    reports = []
    for path in sorted(directory.glob("*.json")):
        try:
            document = json.loads(path.read_text())
            if isinstance(document, dict) and "servers" in document and "format" in document:
                continue  # the merged matrix written beside the reports (nbdmatrix.py)
            reports.append((path, document, ""))
        except (OSError, ValueError) as exc:
            reports.append((path, None, str(exc)))
    return reports


#: Outcomes worth a row on the findings page, worst first (conformance/report.py's names).
NOTABLE = ("error", "failed", "xpassed", "warning", "xfailed")
BUILT_IN = ("reference", "qemu-nbd", "nbdkit", "nbd-server")


class FindingsDirective(SphinxDirective):
    """What each ``reports/*.json`` (written by ``--report``) says, server by server."""

    has_content = False
    option_spec = {"reports": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        directory = REPO / self.options.get("reports", "reports")
        reports = load_reports(directory)
        for path, _, _ in reports:
            self.env.note_dependency(str(path))
        if not reports:
            return [
                _para(
                    nodes.emphasis(
                        text=f"No reports were in {directory.relative_to(REPO)}/ when these "
                        "pages were built: run the commands above, then build the docs again."
                    )
                )
            ]
        result: list[nodes.Node] = []
        for path, report, error in reports:
            result.append(nodes.rubric(text=path.name))
            if report is None or not isinstance(report.get("checks"), list):
                logger.warning(
                    "%s is not a conformance report: %s",
                    path,
                    error or "no 'checks' list",
                    location=self.get_location(),
                )
                continue
            result += self._report(report)
        return result

    def _report(self, report: dict[str, Any]) -> list[nodes.Node]:
        profile = str(report.get("profile", "?"))
        target = str(report.get("target", ""))
        if profile in BUILT_IN:
            command = f"./bootstrap tox -e {profile}"
        else:
            command = f"pytest conformance {target}"
        out: list[nodes.Node] = [
            _para(
                "Server: ",
                nodes.literal(text=target or profile),
                "; reproduce with ",
                nodes.literal(text=command),
                " (SHOULD-level failures counted as failures)."
                if report.get("strict")
                else " (SHOULD-level failures reported as warnings).",
            )
        ]
        summary = report.get("summary")
        if isinstance(summary, dict):
            out.append(
                _para(
                    "Totals: "
                    + ", ".join(
                        f"{value} {key}"
                        for key, value in summary.items()
                        if isinstance(value, int) and key != "exitstatus"
                    )
                    + "."
                )
            )
        checks = [c for c in report["checks"] if isinstance(c, dict)]
        notable = sorted(
            (c for c in checks if c.get("outcome") in NOTABLE),
            key=lambda c: (NOTABLE.index(c["outcome"]), str(c.get("id"))),
        )
        if not notable:
            out.append(_para("No failure, warning or known deviation."))
            return out
        rows = [
            [
                _para(nodes.literal(text=str(c.get("id", "?")))),
                _para(f"{c['outcome']} ({c.get('level', '?')})"),
                _para(str(c.get("section", ""))),
                _para(str(c.get("message", ""))),
            ]
            for c in notable
        ]
        out.append(_table(["Check", "Verdict", "Section", "Message"], rows, [25, 12, 23, 40]))
        return out
