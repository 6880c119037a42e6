"""Local Sphinx extension: the compatibility matrix of the committed reports.

``.. nbd-matrix::`` renders, from the reports in ``nbd_matrix_reports``
(``docs/matrix/*.json``, written by ``nbd-conformance matrix --out-dir
docs/matrix``), one row per server: version, totals, and whether it meets
the spec's Baseline and Maximum interoperability sets.  After an HTML build
the page itself is written to ``matrix.html`` at the root of the output,
from the same reports, so the table, the page and the prose that
``tests/test_matrix_docs.py`` checks against them never disagree.

Unlike ``nbddocs``, this imports the suite's ``conformance.matrix`` (pure
functions over JSON; the docs env installs the package).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from docutils import nodes
from nbddocs import REPO, _para, _table
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from conformance.matrix import merge, render

logger = logging.getLogger(__name__)

PAGE = "matrix.html"


def report_paths(app: Sphinx) -> list[Path]:
    directory = REPO / app.config.nbd_matrix_reports
    return [p for p in sorted(directory.glob("*.json")) if not merge.is_matrix(p)]


def build_matrix(paths: list[Path]) -> dict[str, Any]:
    reports = [(p.stem, merge.load_report(p)) for p in paths]
    ordered = [reports[i] for i in merge.column_order(reports, list(merge.BUILT_IN))]
    return merge.merge(ordered)


def page(matrix: dict[str, Any]) -> str:
    return render.render(matrix, title="NBD conformance matrix: Debian 12's servers")


class MatrixDirective(SphinxDirective):
    """One row per server of the committed reports, and a link to the page."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        paths = report_paths(self.env.app)
        for path in paths:
            self.env.note_dependency(str(path))
        if not paths:
            logger.warning(
                "no reports in %s: run nbd-conformance matrix --out-dir %s",
                self.config.nbd_matrix_reports,
                self.config.nbd_matrix_reports,
                location=self.get_location(),
            )
            return []
        try:
            matrix = build_matrix(paths)
        except merge.NotAReport as err:
            logger.warning("%s", err, location=self.get_location())
            return []
        rows = []
        for server in matrix["servers"]:
            counts = server["counts"]
            rows.append(
                [
                    _para(nodes.literal(text=server["key"])),
                    _para(server["version"] or "unknown"),
                    _para(", ".join(f"{n} {o}" for o, n in counts.items())),
                    *(
                        _para(server["sets"][s]["status"])
                        for s in ("Baseline", "Maximum interoperability")
                    ),
                    _para(f"{server['duration']:.0f} s" if server.get("duration") else "?"),
                ]
            )
        return [
            _table(
                ["Server", "Version", "Verdicts", "Baseline", "Maximum interoperability", "Run"],
                rows,
                [12, 22, 36, 10, 14, 6],
            ),
            _para(
                f"{sum(len(s['checks']) for s in matrix['sections'])} checks; the page: ",
                nodes.reference(text=PAGE, refuri=PAGE),
                f" ({len(page(matrix).encode()) // 1000} kB in one file, no network access, "
                "filters with a few lines of JavaScript).",
            ),
        ]


def write_page(app: Sphinx, exception: Exception | None) -> None:
    """After an HTML build, write the matrix page beside index.html."""
    if exception is not None or app.builder.format != "html":
        return
    paths = report_paths(app)
    if paths:
        page = render.render(
            build_matrix(paths), title="NBD conformance matrix: Debian 12's servers"
        )
        (Path(app.outdir) / PAGE).write_text(page)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("nbd_matrix_reports", "docs/matrix", "env")
    app.add_directive("nbd-matrix", MatrixDirective)
    app.connect("build-finished", write_page)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
