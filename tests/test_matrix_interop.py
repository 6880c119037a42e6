"""The spec's Baseline and Maximum interoperability sets: quoted faithfully, mapped to checks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.matrix import interop
from conformance.matrix.interop import BASELINE, MAXIMUM_INTEROPERABILITY, Status, score

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "docs" / "spec" / "proto.md"


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("- ", " ")).strip()


def subsection(heading: str) -> str:
    """The text of '### HEADING' in proto.md, up to the next heading."""
    text = SPEC.read_text()
    start = text.index(f"\n### {heading}\n")
    end = text.index("\n#", start + 1)
    return flat(text[start:end])


@pytest.mark.parametrize("feature_set", interop.SETS, ids=lambda s: s.name)
def test_every_sentence_is_quoted_from_its_subsection(feature_set):
    text = subsection(feature_set.name)
    assert flat(feature_set.preamble) in text
    for feature in feature_set.features:
        assert flat(feature.sentence) in text, feature.sentence


@pytest.fixture(scope="module")
def suite_nodeids() -> list[str]:
    """Every check of the suite, as pytest collects it."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "conformance",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [line for line in done.stdout.splitlines() if "::" in line]


@pytest.mark.parametrize("feature_set", interop.SETS, ids=lambda s: s.name)
def test_every_glob_matches_a_check_of_the_suite(feature_set, suite_nodeids):
    for feature in feature_set.features:
        for pattern in feature.nodeids:
            assert any(
                feature.covers(n) and interop.fnmatchcase(n, pattern) for n in suite_nodeids
            ), f"{pattern!r} ({feature.sentence}) matches no check"


def test_the_sets_cover_a_fair_share_of_the_suite(suite_nodeids):
    baseline = [n for n in suite_nodeids if BASELINE.covers(n)]
    maximum = [n for n in suite_nodeids if MAXIMUM_INTEROPERABILITY.covers(n)]
    assert len(baseline) >= 20 and len(maximum) >= 20
    assert "conformance/test_options.py::test_abort_gets_ack" in baseline
    assert "conformance/test_tls.py::test_starttls_gets_ack_then_tls" in maximum
    assert interop.sets_of("conformance/test_write.py::test_flushed_write_survives_disconnect") == [
        "Baseline",
        "Maximum interoperability",
    ]


def every_check_of(feature_set, outcome):
    """One check per glob of the set, all with OUTCOME (globs made concrete)."""
    return {
        pattern.replace("*", "x").replace("[[]", "["): outcome
        for feature in feature_set.features
        for pattern in feature.nodeids
    }


def test_all_passing_meets_the_set():
    result = score(BASELINE, every_check_of(BASELINE, "passed"))
    assert result.status is Status.MET
    assert result.reasons() == []


@pytest.mark.parametrize("bad", ["failed", "error", "xfailed", "server-gone"])
def test_one_broken_check_fails_the_set(bad):
    outcomes = every_check_of(BASELINE, "passed")
    outcomes["conformance/test_options.py::test_abort_gets_ack"] = bad
    result = score(BASELINE, outcomes)
    assert result.status is Status.NOT_MET
    assert result.reasons() == [
        "the `NBD_OPT_ABORT` message, and its response. -- failing: test_abort_gets_ack"
    ]


def test_a_warning_still_shows_the_feature_implemented():
    outcomes = every_check_of(MAXIMUM_INTEROPERABILITY, "warning")
    assert score(MAXIMUM_INTEROPERABILITY, outcomes).status is Status.MET


def test_a_feature_entirely_unsupported_is_not_met():
    outcomes = every_check_of(MAXIMUM_INTEROPERABILITY, "passed")
    tls = MAXIMUM_INTEROPERABILITY.features[0]
    for nodeid in outcomes:
        if tls.covers(nodeid):
            outcomes[nodeid] = "unsupported"
    result = score(MAXIMUM_INTEROPERABILITY, outcomes)
    assert result.status is Status.NOT_MET
    assert result.reasons()[0].startswith("TLS-encrypted communication")


def test_a_feature_partly_unsupported_is_met():
    outcomes = every_check_of(BASELINE, "passed")
    outcomes["conformance/test_options.py::test_abort_with_data_gets_ack"] = "unsupported"
    assert score(BASELINE, outcomes).status is Status.MET


@pytest.mark.parametrize("neutral", ["skipped", "not-run", "absent", "some-new-verdict"])
def test_nothing_run_leaves_the_set_undetermined(neutral):
    result = score(BASELINE, every_check_of(BASELINE, neutral))
    assert result.status is Status.UNDETERMINED
    assert all(reason.endswith("no check ran") for reason in result.reasons())
    assert result.to_json()["status"] == "undetermined"


def test_a_set_not_met_gives_only_the_reasons_it_is_not_met():
    outcomes = {"conformance/test_options.py::test_abort_gets_ack": "failed"}
    assert score(BASELINE, outcomes).reasons() == [
        "the `NBD_OPT_ABORT` message, and its response. -- failing: test_abort_gets_ack"
    ]
