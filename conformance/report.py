"""Verdicts: from pytest reports to per-check results, the section table and JSON.

Kept free of pytest's machinery (it takes plain values) so that the
aggregation can be unit-tested and works the same on an xdist controller,
which only ever sees the workers' serialised reports.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

from conformance.verdict import Verdict

#: Verdicts, worst first (a check's verdict is the worst of its phases).
OUTCOMES = tuple(verdict.value for verdict in Verdict)

#: The columns of the section table: header, outcomes counted in it.
#: An intermittent known deviation that did not show this time ("xpassed") is a
#: pass: the run exits 0 for it, and the table must say the same.
COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("passed", ("passed", "xpassed")),
    ("failed", ("failed", "error")),
    ("warnings", ("warning",)),
    ("known", ("xfailed",)),
    ("unsupported", ("unsupported",)),
    ("not-run", ("not-run",)),
    ("skipped", ("skipped",)),
)

NO_SECTION = "(no section)"


@dataclasses.dataclass
class CheckResult:
    """The verdict of one check (one pytest item)."""

    id: str
    nodeid: str
    section: str = NO_SECTION
    level: str = "MUST"
    quote: str | None = None
    outcome: str = Verdict.PASSED.value
    message: str = ""
    duration: float = 0.0
    #: For a NOT_RUN verdict, its NotRunReason's value ("writes", "server gone"...).
    reason: str | None = None
    #: What went over the wire (conformance/evidence.py), for failures and warnings.
    evidence: str | None = None

    def merge(self, verdict: Verdict, message: str, reason: str | None = None) -> None:
        """Fold in one phase (setup, call, teardown): the worst verdict wins."""
        current = Verdict(self.outcome)
        if verdict.worse_than(current) or (verdict == current and not self.message):
            self.outcome = verdict.value
            self.message = message
            self.reason = reason


class Collector:
    """Accumulates phase reports into one :class:`CheckResult` per check."""

    def __init__(self) -> None:
        self.results: dict[str, CheckResult] = {}

    def add(
        self,
        *,
        nodeid: str,
        when: str,
        verdict: Verdict,
        properties: dict[str, Any],
        message: str,
        reason: str | None = None,
        duration: float = 0.0,
    ) -> None:
        """Fold in one phase report, whose VERDICT the plugin decided where it ran."""
        result = self.results.get(nodeid)
        if result is None:
            result = CheckResult(
                id=properties.get("nbd_check", nodeid.rsplit("::", 1)[-1]),
                nodeid=nodeid,
                section=properties.get("nbd_section", NO_SECTION),
                level=properties.get("nbd_level", "MUST"),
                quote=properties.get("nbd_quote"),
            )
            self.results[nodeid] = result
        result.duration += duration
        if result.evidence is None and properties.get("nbd_evidence"):
            result.evidence = str(properties["nbd_evidence"])
        if verdict == Verdict.PASSED and when != "call":
            return
        result.merge(verdict, message, reason)


def section_table(results: Iterable[CheckResult]) -> list[dict[str, Any]]:
    """One row per section (in order of first appearance) plus a TOTAL row."""
    rows: dict[str, dict[str, Any]] = {}
    total: dict[str, Any] = {"section": "TOTAL", "checks": 0}
    for header, _ in COLUMNS:
        total[header] = 0
    for result in results:
        row = rows.get(result.section)
        if row is None:
            row = {"section": result.section, "checks": 0}
            for header, _ in COLUMNS:
                row[header] = 0
            rows[result.section] = row
        for target in (row, total):
            target["checks"] += 1
            for header, outcomes in COLUMNS:
                if result.outcome in outcomes:
                    target[header] += 1
    return [*sorted(rows.values(), key=lambda r: r["section"]), total]


def render_table(rows: list[dict[str, Any]], width: int = 120) -> list[str]:
    """The table as text lines, h2spec-like; long section paths keep their tail."""
    headers = ["checks"] + [header for header, _ in COLUMNS]
    numbers = " ".join(f"{{:>{len(h)}}}" for h in headers)
    room = max(24, width - len(numbers.format(*headers)) - 1)
    section_width = min(room, max(len("section"), *(len(r["section"]) for r in rows)))
    head = f"{'section':<{section_width}} " + numbers.format(*headers)
    lines = [head, "-" * len(head)]
    for row in rows:
        section = row["section"]
        if len(section) > section_width:
            section = "..." + section[-(section_width - 3) :]
        if row["section"] == "TOTAL":
            lines.append("-" * len(head))
        lines.append(f"{section:<{section_width}} " + numbers.format(*(row[h] for h in headers)))
    return lines


def not_run_counts(results: Iterable[CheckResult]) -> dict[str, int]:
    """How many checks were not run, per NotRunReason value."""
    counts: dict[str, int] = {}
    for result in results:
        if result.outcome == Verdict.NOT_RUN.value:
            reason = result.reason or "unknown"
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def to_json(results: Iterable[CheckResult], **meta: Any) -> str:
    checks = sorted(results, key=lambda r: r.nodeid)
    document = {
        **meta,
        "summary": section_table(checks)[-1],
        "not_run": not_run_counts(checks),
        "sections": section_table(checks)[:-1],
        "checks": [dataclasses.asdict(r) for r in checks],
    }
    return json.dumps(document, indent=2, sort_keys=False) + "\n"
