"""Verdict aggregation of the conformance suite: phases to checks, checks to sections."""

from __future__ import annotations

import json

from conformance.report import (
    Collector,
    not_run_counts,
    render_table,
    section_table,
    to_json,
)
from conformance.verdict import NotRun, NotRunReason, Unsupported, Verdict, decide

PROPS = {"nbd_check": "test_x", "nbd_section": "A / B", "nbd_level": "MUST"}


def add(collector, nodeid, when, verdict, message="", props=None, reason=None):
    collector.add(
        nodeid=nodeid,
        when=when,
        verdict=Verdict(verdict),
        properties=props or PROPS,
        message=message,
        reason=reason,
        duration=0.1,
    )


def verdict(
    when: str,
    outcome: str,
    wasxfail: str | None = None,
    exception: BaseException | None = None,
    should: bool = False,
    strict: bool = False,
) -> str:
    return decide(
        when=when,
        outcome=outcome,
        wasxfail=wasxfail,
        exception=exception,
        should_level=should,
        strict=strict,
    ).value


def test_decide_every_verdict():
    assert verdict("call", "passed") == "passed"
    assert verdict("call", "failed", exception=AssertionError()) == "failed"
    assert verdict("setup", "failed") == "error"
    assert verdict("teardown", "failed") == "error"
    assert verdict("call", "failed", exception=AssertionError(), should=True) == "warning"
    assert verdict("call", "skipped", wasxfail="known") == "xfailed"
    assert verdict("call", "passed", wasxfail="known") == "xpassed"
    assert verdict("call", "skipped", exception=Unsupported("no")) == "unsupported"
    not_run = NotRun(NotRunReason.WRITES, "pass --allow-writes")
    assert verdict("setup", "skipped", exception=not_run) == "not-run"
    assert verdict("setup", "skipped", exception=Exception("cannot")) == "skipped"


def test_only_assertions_of_should_checks_become_warnings():
    """A crash of the server, or a timeout of the suite's own, is never softened."""
    assert verdict("call", "failed", exception=RuntimeError("crash"), should=True) == "failed"
    assert verdict("call", "failed", exception=AssertionError(), should=True, strict=True) == (
        "failed"
    )
    assert verdict("setup", "failed", exception=AssertionError(), should=True) == "error"


def test_verdicts_are_ranked_worst_first():
    assert Verdict.ERROR.worse_than(Verdict.FAILED)
    assert Verdict.FAILED.worse_than(Verdict.WARNING)
    assert Verdict.NOT_RUN.worse_than(Verdict.PASSED)


def test_phases_fold_into_the_worst_verdict():
    c = Collector()
    add(c, "t.py::a", "setup", "passed")
    add(c, "t.py::a", "call", "passed")
    add(c, "t.py::a", "teardown", "error", "server did not stop")
    add(c, "t.py::b", "setup", "passed")
    add(c, "t.py::b", "call", "failed", "expected X, actual Y")
    add(c, "t.py::b", "teardown", "passed")
    result_a, result_b = c.results["t.py::a"], c.results["t.py::b"]
    assert (result_a.outcome, result_a.message) == ("error", "server did not stop")
    assert (result_b.outcome, result_b.message) == ("failed", "expected X, actual Y")
    assert result_b.section == "A / B" and result_b.id == "test_x"
    assert abs(result_b.duration - 0.3) < 1e-9


def test_warning_keeps_its_message():
    c = Collector()
    add(c, "t.py::w", "setup", "passed")
    add(c, "t.py::w", "call", "warning", "SHOULD: expected EPERM")
    assert c.results["t.py::w"].outcome == "warning"
    assert c.results["t.py::w"].message == "SHOULD: expected EPERM"


def test_section_table_counts_per_column():
    c = Collector()
    other = {**PROPS, "nbd_section": "C"}
    add(c, "a", "call", "passed")
    add(c, "b", "call", "failed", "boom")
    add(c, "c", "call", "unsupported", "no trim")
    add(c, "d", "setup", "not-run", "writes: pass --allow-writes", props=other, reason="writes")
    add(c, "e", "call", "warning", props=other)
    rows = {r["section"]: r for r in section_table(c.results.values())}
    assert rows["A / B"] == {
        "section": "A / B",
        "checks": 3,
        "passed": 1,
        "failed": 1,
        "warnings": 0,
        "known": 0,
        "unsupported": 1,
        "not-run": 0,
        "skipped": 0,
    }
    assert rows["C"]["not-run"] == 1 and rows["C"]["warnings"] == 1
    assert rows["TOTAL"]["checks"] == 5
    lines = render_table(section_table(c.results.values()), width=80)
    assert lines[0].split() == [
        "section",
        "checks",
        "passed",
        "failed",
        "warnings",
        "known",
        "unsupported",
        "not-run",
        "skipped",
    ]
    assert lines[-1].split() == ["TOTAL", "5", "1", "1", "1", "0", "1", "1", "0"]
    assert all(len(line) <= 80 for line in lines)


def test_long_sections_keep_their_tail():
    c = Collector()
    add(c, "a", "call", "passed", props={**PROPS, "nbd_section": "X / " * 30 + "Leaf"})
    lines = render_table(section_table(c.results.values()), width=80)
    assert lines[2].startswith("...") and " / Leaf " in lines[2]


def test_json_report_lists_every_check():
    c = Collector()
    add(c, "t.py::b", "call", "failed", "expected X, actual Y")
    add(c, "t.py::a", "call", "passed")
    document = json.loads(to_json(c.results.values(), profile="qemu-nbd"))
    assert document["profile"] == "qemu-nbd"
    assert [check["nodeid"] for check in document["checks"]] == ["t.py::a", "t.py::b"]
    assert document["checks"][1] == {
        "id": "test_x",
        "nodeid": "t.py::b",
        "section": "A / B",
        "level": "MUST",
        "quote": None,
        "outcome": "failed",
        "message": "expected X, actual Y",
        "duration": 0.1,
        "reason": None,
        "evidence": None,
    }
    assert document["summary"]["failed"] == 1


def test_intermittent_deviation_not_seen_counts_as_passed():
    """A run that exits 0 shows no failure: an xpassed intermittent deviation is a pass."""
    c = Collector()
    add(c, "a", "call", "xpassed", "known nbdkit deviation (intermittent)")
    assert c.results["a"].outcome == "xpassed"
    total = section_table(c.results.values())[-1]
    assert total["passed"] == 1 and total["failed"] == 0


def test_not_run_checks_are_counted_by_reason():
    c = Collector()
    for nodeid, reason in [("a", "writes"), ("b", "disruptive"), ("c", "disruptive")]:
        add(c, nodeid, "setup", "not-run", f"{reason}: ...", reason=reason)
    add(c, "d", "setup", "not-run", "server gone: it died during t.py::x", reason="server gone")
    assert not_run_counts(c.results.values()) == {"writes": 1, "disruptive": 2, "server gone": 1}
    document = json.loads(to_json(c.results.values(), target_gone="it died during t.py::x"))
    assert document["not_run"] == {"writes": 1, "disruptive": 2, "server gone": 1}
    assert document["summary"]["not-run"] == 4
    assert document["target_gone"] == "it died during t.py::x"


def test_evidence_of_a_failure_reaches_the_json_report():
    c = Collector()
    props = {**PROPS, "nbd_evidence": "wire#1 C: READ ...\nwire#1 S: <connection closed>"}
    add(c, "t.py::a", "call", "failed", "boom", props=props)
    add(c, "t.py::a", "teardown", "passed", props=props)
    document = json.loads(to_json(c.results.values()))
    assert document["checks"][0]["evidence"].endswith("S: <connection closed>")
