"""What a run prints at its end: warnings, checks not run, a gone target, the table.

Plain functions of the collected results (:mod:`conformance.report`), so the
plugin's hook stays a few lines and the layout can be read in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from conformance.liveness import GoneRecord
from conformance.report import CheckResult, not_run_counts, render_table, section_table
from conformance.verdict import NotRunReason, Verdict


def not_run_lines(counts: dict[str, int]) -> list[str]:
    """'not run: 66 (they may crash ...: --allow-disruptive lets them)', per reason."""
    remedies = {reason.value: reason.remedy for reason in NotRunReason}
    return [
        f"not run: {count} ({remedies.get(reason, reason)})"
        for reason, count in sorted(counts.items())
    ]


def write_summary(
    tr: Any,
    results: Sequence[CheckResult],
    target: str,
    gone: GoneRecord | None,
    coverage: Sequence[str],
) -> None:
    """Write the end of a run to pytest's terminal reporter TR."""
    ordered = sorted(results, key=lambda r: r.nodeid)
    warnings = [r for r in ordered if r.outcome == Verdict.WARNING.value]
    if warnings:
        tr.write_sep(
            "=", f"SHOULD-level warnings ({len(warnings)}; --strict makes them fail)", yellow=True
        )
        for r in warnings:
            tr.write_line(f"WARNING {r.id} [{r.section}]: {r.message}")
    left_out = [r for r in ordered if r.outcome == Verdict.NOT_RUN.value]
    if left_out:
        tr.write_sep("=", f"checks not run ({len(left_out)})")
        for r in left_out:
            tr.write_line(f"NOT RUN {r.id} [{r.section}]: {r.reason}")
    if gone is not None:
        tr.write_sep("=", "THE SERVER UNDER TEST IS GONE", red=True, bold=True)
        tr.write_line(gone.describe(), red=True)
    reappeared = [r for r in ordered if r.outcome == Verdict.XPASSED.value]
    if reappeared:
        tr.write_sep("=", f"intermittent known deviations not seen this run ({len(reappeared)})")
        for r in reappeared:
            tr.write_line(f"PASSED {r.id} [{r.section}]: {r.message}")
    tr.write_sep("=", f"NBD conformance: {target}")
    # Full section paths are the point of the table: do not squeeze it to 80 columns.
    for line in render_table(section_table(results), width=max(tr._tw.fullwidth, 140)):
        tr.write_line(line)
    for line in not_run_lines(not_run_counts(results)):
        tr.write_line(line)
    # What the suite as a whole can say (the requirement ledger, docs/traceability).
    for line in coverage:
        tr.write_line(line)
