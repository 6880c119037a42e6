"""Running the suite per server for the matrix, and ``nbd-conformance matrix`` end to end."""

from __future__ import annotations

import json

from conformance.cli import main as conformance_main
from conformance.matrix import runner

ONE_CHECK = ["-n", "0", "-k", "test_greeting_starts_with_nbdmagic"]


def test_targets_are_named_and_never_collide():
    targets = runner.targets(
        ["reference", "qemu-nbd"],
        ["/usr/bin/myserver -k {socket}", "myserver --other {socket}"],
        ["nbd+unix:///?socket=/s"],
    )
    assert [t.key for t in targets] == ["reference", "qemu-nbd", "myserver", "myserver-2", "uri"]
    assert targets[0].options == ("--nbd-server=reference",)
    assert targets[1].version_command == ("qemu-nbd", "--version")
    assert targets[3].options == ("--server-cmd", "myserver --other {socket}")
    assert targets[3].configuration == "myserver --other {socket}"
    assert runner.profile_configuration("nbdkit").startswith("nbdkit -U SOCK -f --exit-with-parent")


def test_versions_are_read_from_what_the_tools_print():
    assert runner.parse_version("This is nbd-server version 3.24\n") == "nbd-server 3.24"
    assert runner.parse_version("\nqemu-nbd 7.2.22 (Debian 1:7.2+dfsg-7)\nWritten by...") == (
        "qemu-nbd 7.2.22 (Debian 1:7.2+dfsg-7)"
    )
    assert runner.parse_version("") == ""


def test_the_reference_server_is_always_installed():
    assert runner.installed_profiles()[0] == "reference"


def test_a_run_writes_its_report_with_the_version(tmp_path):
    target = runner.targets(["reference"], [], [])[0]
    result = runner.run_target(target, tmp_path, ONE_CHECK)
    assert result.exitstatus == 0
    report = json.loads(result.report_path.read_text())
    assert report["version"].startswith("nbd-reference-server ")
    assert report["configuration"].startswith("python -m reference_server ")
    assert "-k SOCK" in report["configuration"]
    assert [c["outcome"] for c in report["checks"]] == ["passed"]
    assert (tmp_path / "reference.log").read_text()


def test_a_server_that_never_starts_still_gives_a_report(tmp_path):
    target = runner.targets([], ["false {socket}"], [])[0]
    result = runner.run_target(target, tmp_path, ONE_CHECK)
    assert result.exitstatus != 0
    report = json.loads(result.report_path.read_text())
    assert [c["outcome"] for c in report["checks"]] == ["error"]


def test_a_run_that_writes_no_report_gets_a_stand_in(tmp_path):
    target = runner.targets([], [], ["http://not-nbd/"])[0]
    result = runner.run_target(target, tmp_path, ONE_CHECK)
    report = json.loads(result.report_path.read_text())
    assert report["checks"] == []
    assert "wrote no report" in report["error"]
    assert report["exitstatus"] == result.exitstatus != 0


def test_matrix_command_runs_and_assembles(tmp_path, capsys):
    out = tmp_path / "out"
    status = conformance_main(
        [
            *("matrix", "--nbd-server=reference", "--server-cmd", "false {socket}"),
            *("--out-dir", str(out), "-n", "0", "--", "-k", "test_greeting_starts_with_nbdmagic"),
        ]
    )
    assert status == 0
    assert "matrix.html" in capsys.readouterr().out
    matrix = json.loads((out / "matrix.json").read_text())
    assert [s["key"] for s in matrix["servers"]] == ["reference", "false"]
    # Assembling the reports again (as from CI jobs) gives the same document.
    again = tmp_path / "again"
    status = conformance_main(
        ["matrix", str(out / "false.json"), str(out / "reference.json"), "--out-dir", str(again)]
    )
    assert status == 0
    assert json.loads((again / "matrix.json").read_text()) == matrix
    assert (again / "matrix.html").read_text().startswith("<!DOCTYPE html>")


def test_matrix_command_refuses_what_is_not_a_report(tmp_path, capsys):
    bogus = tmp_path / "bogus.json"
    bogus.write_text("[]")
    assert conformance_main(["matrix", str(bogus), "--out-dir", str(tmp_path)]) == 2
    assert "not a conformance report" in capsys.readouterr().err


def test_a_glob_of_reports_skips_the_matrix_written_beside_them(tmp_path, capsys):
    reference = json.dumps({"profile": "reference", "checks": []})
    (tmp_path / "reference.json").write_text(reference)
    assert (
        conformance_main(["matrix", str(tmp_path / "reference.json"), "--out-dir", str(tmp_path)])
        == 0
    )
    again = sorted(str(p) for p in tmp_path.glob("*.json"))
    assert len(again) == 2
    assert conformance_main(["matrix", *again, "--out-dir", str(tmp_path)]) == 0
    assert "built from 1 reports" in capsys.readouterr().out
