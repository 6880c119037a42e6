"""Verdict aggregation of the conformance suite: phases to checks, checks to sections."""

from __future__ import annotations

import json

from conformance.report import (
    NOT_RUN_DISRUPTIVE,
    NOT_RUN_GONE,
    NOT_RUN_PREFIX,
    NOT_RUN_WRITES,
    Collector,
    classify,
    not_run,
    not_run_counts,
    render_table,
    section_table,
    to_json,
)
from conformance.spec import UNSUPPORTED_PREFIX

PROPS = {"nbd_check": "test_x", "nbd_section": "A / B", "nbd_level": "MUST"}


def add(collector, nodeid, when, outcome, message="", props=None, wasxfail=None):
    collector.add(
        nodeid=nodeid,
        when=when,
        outcome=outcome,
        properties=props or PROPS,
        message=message,
        wasxfail=wasxfail,
        duration=0.1,
    )


def verdict(
    when: str,
    outcome: str,
    wasxfail: str | None = None,
    skip_reason: str = "",
    recorded: str | None = None,
) -> str:
    return classify(when, outcome, wasxfail=wasxfail, skip_reason=skip_reason, verdict=recorded)


def test_classify_every_outcome():
    assert verdict("call", "passed") == "passed"
    assert verdict("call", "failed") == "failed"
    assert verdict("setup", "failed") == "error"
    assert verdict("teardown", "failed") == "error"
    assert verdict("call", "passed", recorded="warning") == "warning"
    assert verdict("call", "skipped", wasxfail="known") == "xfailed"
    assert verdict("call", "passed", wasxfail="known") == "xpassed"
    assert verdict("call", "skipped", skip_reason=UNSUPPORTED_PREFIX + "no") == "unsupported"
    assert verdict("setup", "skipped", skip_reason=NOT_RUN_PREFIX + "w") == "not-run"
    assert verdict("setup", "skipped", skip_reason="cannot") == "skipped"


def test_phases_fold_into_the_worst_verdict():
    c = Collector()
    add(c, "t.py::a", "setup", "passed")
    add(c, "t.py::a", "call", "passed")
    add(c, "t.py::a", "teardown", "failed", "server did not stop")
    add(c, "t.py::b", "setup", "passed")
    add(c, "t.py::b", "call", "failed", "expected X, actual Y")
    add(c, "t.py::b", "teardown", "passed")
    result_a, result_b = c.results["t.py::a"], c.results["t.py::b"]
    assert (result_a.outcome, result_a.message) == ("error", "server did not stop")
    assert (result_b.outcome, result_b.message) == ("failed", "expected X, actual Y")
    assert result_b.section == "A / B" and result_b.id == "test_x"
    assert abs(result_b.duration - 0.3) < 1e-9


def test_warning_keeps_the_recorded_message():
    c = Collector()
    props = {**PROPS, "nbd_verdict": "warning", "nbd_message": "SHOULD: expected EPERM"}
    add(c, "t.py::w", "setup", "passed")
    add(c, "t.py::w", "call", "passed", props=props)
    assert c.results["t.py::w"].outcome == "warning"
    assert c.results["t.py::w"].message == "SHOULD: expected EPERM"


def test_xfail_message_is_the_deviation():
    c = Collector()
    add(c, "t.py::x", "call", "skipped", "AssertionError", wasxfail="known qemu-nbd deviation")
    assert c.results["t.py::x"].outcome == "xfailed"
    assert c.results["t.py::x"].message == "known qemu-nbd deviation"


def test_section_table_counts_per_column():
    c = Collector()
    other = {**PROPS, "nbd_section": "C"}
    add(c, "a", "call", "passed")
    add(c, "b", "call", "failed", "boom")
    add(c, "c", "call", "skipped", UNSUPPORTED_PREFIX + "no trim")
    add(c, "d", "setup", "skipped", NOT_RUN_PREFIX + "writes", props=other)
    add(c, "e", "call", "passed", props={**other, "nbd_verdict": "warning"})
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
        "evidence": None,
    }
    assert document["summary"]["failed"] == 1


def test_intermittent_deviation_not_seen_counts_as_passed():
    """A run that exits 0 shows no failure: an xpassed intermittent deviation is a pass."""
    c = Collector()
    add(c, "a", "call", "passed", wasxfail="known nbdkit deviation (intermittent)")
    assert c.results["a"].outcome == "xpassed"
    total = section_table(c.results.values())[-1]
    assert total["passed"] == 1 and total["failed"] == 0


def test_not_run_checks_are_counted_by_reason():
    c = Collector()
    add(c, "a", "setup", "skipped", not_run(NOT_RUN_WRITES, "pass --allow-writes"))
    add(c, "b", "setup", "skipped", not_run(NOT_RUN_DISRUPTIVE, "pass --allow-disruptive"))
    add(c, "c", "setup", "skipped", not_run(NOT_RUN_DISRUPTIVE, "pass --allow-disruptive"))
    add(c, "d", "setup", "skipped", not_run(NOT_RUN_GONE, "it died during t.py::x"))
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
