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

from conformance.spec import UNSUPPORTED_PREFIX

#: Skip-reason prefix of a check the suite chose not to run, followed by one of
#: the reasons below and a colon: "NOT RUN: writes: ...".
NOT_RUN_PREFIX = "NOT RUN: "
#: It writes, and the target is not the suite's and --allow-writes was not given.
NOT_RUN_WRITES = "writes"
#: It may crash, wedge or stop the target, and --allow-disruptive was not given.
NOT_RUN_DISRUPTIVE = "disruptive"
#: The target stopped answering during an earlier check.
NOT_RUN_GONE = "server gone"


def not_run(reason: str, detail: str) -> str:
    """The skip reason of a check not run for REASON (one of the NOT_RUN_* names)."""
    return f"{NOT_RUN_PREFIX}{reason}: {detail}"


def not_run_reason(message: str) -> str:
    """The NOT_RUN_* reason a not-run verdict's message starts with."""
    return message.removeprefix(NOT_RUN_PREFIX).split(":", 1)[0]


#: Verdicts, worst first (a check's verdict is the worst of its phases).
OUTCOMES = (
    "error",
    "failed",
    "xpassed",
    "warning",
    "xfailed",
    "unsupported",
    "not-run",
    "skipped",
    "passed",
)
_RANK = {name: i for i, name in enumerate(OUTCOMES)}

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
    outcome: str = "passed"
    message: str = ""
    duration: float = 0.0
    #: What went over the wire (conformance/evidence.py), for failures and warnings.
    evidence: str | None = None

    def merge(self, outcome: str, message: str) -> None:
        """Fold in one phase (setup, call, teardown): the worst verdict wins."""
        if _RANK[outcome] < _RANK[self.outcome] or (outcome == self.outcome and not self.message):
            self.outcome = outcome
            self.message = message


def classify(
    when: str, outcome: str, *, wasxfail: str | None, skip_reason: str, verdict: str | None
) -> str:
    """The verdict of one phase report.

    OUTCOME is pytest's ("passed", "failed", "skipped"); VERDICT is what the
    plugin recorded in the report's user properties ("warning").
    """
    if wasxfail is not None:
        return "xfailed" if outcome == "skipped" else "xpassed"
    if outcome == "failed":
        return "failed" if when == "call" else "error"
    if outcome == "skipped":
        if skip_reason.startswith(UNSUPPORTED_PREFIX):
            return "unsupported"
        if skip_reason.startswith(NOT_RUN_PREFIX):
            return "not-run"
        return "skipped"
    return verdict or "passed"


class Collector:
    """Accumulates phase reports into one :class:`CheckResult` per check."""

    def __init__(self) -> None:
        self.results: dict[str, CheckResult] = {}

    def add(
        self,
        *,
        nodeid: str,
        when: str,
        outcome: str,
        properties: dict[str, Any],
        message: str,
        wasxfail: str | None = None,
        duration: float = 0.0,
    ) -> None:
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
        verdict = properties.get("nbd_verdict")
        phase = classify(
            when,
            outcome,
            wasxfail=wasxfail,
            skip_reason=message,
            verdict=verdict if when == "call" else None,
        )
        if phase == "passed" and when != "call":
            return
        if verdict == "warning" and when == "call":
            message = properties.get("nbd_message", message)
        if phase == "xfailed":
            message = wasxfail or message
        result.merge(phase, message)


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
    """How many checks were not run, per NOT_RUN_* reason."""
    counts: dict[str, int] = {}
    for result in results:
        if result.outcome == "not-run":
            reason = not_run_reason(result.message)
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
