"""Merging conformance reports into the matrix: columns, rows, cells, rerun commands."""

from __future__ import annotations

import json

import pytest

from conformance.matrix import merge
from conformance.report import Collector, to_json
from conformance.verdict import Verdict


def report(profile, outcomes, **meta):
    """A report as conformance/report.py writes it: OUTCOMES maps nodeid -> (outcome, message)."""
    checks = []
    for nodeid, verdict in outcomes.items():
        outcome, message = verdict if isinstance(verdict, tuple) else (verdict, "")
        checks.append(
            {
                "id": nodeid.rsplit("::", 1)[-1],
                "nodeid": nodeid,
                "section": meta.pop(f"section:{nodeid}", "Values / Option types"),
                "level": "MUST",
                "quote": "The server MUST reply.",
                "outcome": outcome,
                "message": message,
                "duration": 0.1,
            }
        )
    return {"profile": profile, "target": f"--nbd-server={profile}", **meta, "checks": checks}


A = "conformance/test_options.py::test_abort_gets_ack"
B = "conformance/test_read.py::test_read_returns_what_was_written[one-byte]"
C = "conformance/test_tls.py::test_starttls_gets_ack_then_tls"


def cells(matrix, nodeid):
    for section in matrix["sections"]:
        for row in section["checks"]:
            if row["nodeid"] == nodeid:
                return row["cells"]
    raise KeyError(nodeid)


def test_a_check_missing_from_one_report_is_absent_in_that_column():
    matrix = merge.merge(
        [
            ("x", report("reference", {A: "passed", B: "passed"})),
            ("y", report("qemu-nbd", {A: "xfailed"})),
        ]
    )
    assert [s["key"] for s in matrix["servers"]] == ["reference", "qemu-nbd"]
    assert cells(matrix, B)["qemu-nbd"]["outcome"] == merge.ABSENT
    assert cells(matrix, A)["qemu-nbd"]["outcome"] == "xfailed"
    assert matrix["servers"][1]["counts"] == {"xfailed": 1, merge.ABSENT: 1}


def test_rows_are_grouped_by_section_each_section_once():
    r = report(
        "reference", {C: "passed", A: "passed", B: "passed"}, **{f"section:{C}": "TLS support"}
    )
    matrix = merge.merge([("r", r)])
    assert [s["section"] for s in matrix["sections"]] == ["TLS support", "Values / Option types"]
    assert [row["nodeid"] for row in matrix["sections"][1]["checks"]] == [A, B]


def test_an_unknown_outcome_is_carried_through():
    matrix = merge.merge([("r", report("nbdkit", {A: ("server-gone", "EOF after 3 requests")}))])
    assert cells(matrix, A)["nbdkit"] == {
        "outcome": "server-gone",
        "message": "EOF after 3 requests",
        "rerun": "nbd-conformance --nbd-server=nbdkit -k test_abort_gets_ack",
    }
    assert matrix["servers"][0]["counts"] == {"server-gone": 1}


def test_evidence_is_kept_when_a_report_has_it():
    r = report("reference", {A: "failed"})
    r["checks"][0]["evidence"] = ["C: NBD_OPT_ABORT", "S: (closed)"]
    matrix = merge.merge([("r", r)])
    assert cells(matrix, A)["reference"]["evidence"] == ["C: NBD_OPT_ABORT", "S: (closed)"]


def test_two_reports_of_one_profile_keep_both_columns_by_file_name():
    matrix = merge.merge(
        [
            ("qemu-nbd-amd64", report("qemu-nbd", {A: "passed"})),
            ("qemu-nbd-arm64", report("qemu-nbd", {A: "failed"})),
        ]
    )
    assert [s["key"] for s in matrix["servers"]] == ["qemu-nbd-amd64", "qemu-nbd-arm64"]
    assert merge.differs(matrix["sections"][0]["checks"][0])


def test_command_and_uri_reports_are_named_by_file():
    r = report("command", {A: "passed"}, target="--server-cmd 'myserver -k {socket}'")
    matrix = merge.merge([("myserver", r)])
    assert matrix["servers"][0]["key"] == "myserver"
    assert cells(matrix, A)["myserver"]["rerun"] == (
        "nbd-conformance --server-cmd 'myserver -k {socket}' -k test_abort_gets_ack"
    )


def test_version_comes_from_the_report_else_from_the_caller():
    matrix = merge.merge(
        [
            ("a", report("nbdkit", {A: "passed"}, version="nbdkit 1.32.5")),
            ("b", report("qemu-nbd", {A: "passed"})),
        ],
        versions={"nbdkit": "ignored", "qemu-nbd": "qemu-nbd 7.2.22"},
    )
    assert [s["version"] for s in matrix["servers"]] == ["nbdkit 1.32.5", "qemu-nbd 7.2.22"]


def test_sets_are_scored_per_server():
    matrix = merge.merge([("r", report("nbd-server", {A: "xfailed"}))])
    baseline = matrix["servers"][0]["sets"]["Baseline"]
    assert baseline["status"] == "not met"
    assert any("test_abort_gets_ack" in reason for reason in baseline["reasons"])
    assert cells(matrix, A) and matrix["sections"][0]["checks"][0]["sets"] == ["Baseline"]


def test_keyword_expression_excludes_checks_whose_names_contain_it():
    ids = ["test_flush", "test_flush_fua", "test_read"]
    assert merge.keyword_expression("test_flush", ids) == "test_flush and not test_flush_fua"
    assert merge.keyword_expression("test_read", ids) == "test_read"
    assert merge.keyword_expression("test_x[a b]", ids) is None


def test_a_check_that_k_cannot_name_is_rerun_by_node_id():
    command = merge.rerun_command(
        "--nbd-server=nbdkit", "test_x[a b]", "conformance/t.py::test_x[a b]", []
    )
    assert command == "pytest --nbd-server=nbdkit 'conformance/t.py::test_x[a b]'"


def test_built_in_servers_come_first_in_their_order():
    reports = [
        ("z", report("mine", {})),
        ("n", report("nbdkit", {})),
        ("r", report("reference", {})),
    ]
    assert merge.column_order(reports, ["reference", "qemu-nbd", "nbdkit"]) == [2, 1, 0]


def test_reports_written_by_the_suite_merge(tmp_path):
    collector = Collector()
    props = {
        "nbd_check": "test_abort_gets_ack",
        "nbd_section": "Values / Option types",
        "nbd_level": "MUST",
    }
    for when, verdict in (("setup", "passed"), ("call", "failed"), ("teardown", "passed")):
        collector.add(
            nodeid=A, when=when, verdict=Verdict(verdict), properties=props, message="no ACK"
        )
    path = tmp_path / "nbd-server.json"
    path.write_text(
        to_json(collector.results.values(), profile="nbd-server", target="--nbd-server=nbd-server")
    )
    matrix = merge.merge([("nbd-server", merge.load_report(path))])
    assert cells(matrix, A)["nbd-server"]["outcome"] == "failed"
    assert cells(matrix, A)["nbd-server"]["message"] == "no ACK"
    assert json.loads(merge.to_json(matrix)) == matrix


def test_a_file_that_is_not_a_report_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"servers": []}')
    with pytest.raises(merge.NotAReport, match="no 'checks' list"):
        merge.load_report(path)
    path.write_text("{")
    with pytest.raises(merge.NotAReport):
        merge.load_report(path)


def test_a_strict_run_is_rerun_strict():
    matrix = merge.merge([("r", report("nbdkit", {A: "failed"}, strict=True))])
    assert cells(matrix, A)["nbdkit"]["rerun"] == (
        "nbd-conformance --nbd-server=nbdkit --nbd-strict -k test_abort_gets_ack"
    )
