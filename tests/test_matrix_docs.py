"""The findings page's prose agrees with the reports committed under docs/matrix/.

docs/findings.rst says, server by server, which checks a Debian server fails
(or passes, where that is news); the matrix on the same page is rendered from
the committed reports.  When the reports are regenerated and a verdict
changes, this test fails until the prose is brought in line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conformance.matrix import merge

REPO = Path(__file__).resolve().parent.parent
FINDINGS = REPO / "docs" / "findings.rst"
REPORTS = REPO / "docs" / "matrix"

#: Verdicts that say a server does not do what a check asks.
NOT_PASSING = {"failed", "error", "xfailed", "warning", "server-gone"}
CHECK = re.compile(r"``(test_\w+(?:\[[^\]`]*\])?)``")


def paragraphs() -> dict[str, tuple[str, str]]:
    """Server profile -> (the term as written, e.g. 'qemu-nbd 7.2'; its indented paragraph)."""
    found: dict[str, tuple[str, str]] = {}
    lines = FINDINGS.read_text().splitlines()
    for i, line in enumerate(lines):
        term = re.match(r"(qemu-nbd|nbdkit|nbd-server) \d", line)
        if not term:
            continue
        body = []
        for following in lines[i + 1 :]:
            if following and not following.startswith("   "):
                break
            body.append(following.strip())
        found[term[1]] = (line, " ".join(body))
    return found


def report(profile: str) -> dict:
    return merge.load_report(REPORTS / f"{profile}.json")


def outcomes(profile: str, name: str) -> set[str]:
    """The verdicts of check NAME (and of its parameters, for an unparametrised name)."""
    return {
        c["outcome"]
        for c in report(profile)["checks"]
        if c["id"] == name or c["id"].startswith(name + "[")
    }


def test_every_built_in_server_has_a_committed_report():
    for profile in merge.BUILT_IN:
        assert report(profile)["checks"], profile
        assert report(profile).get("version"), f"{profile}: the runner records the version"


def test_each_third_party_server_has_a_paragraph():
    assert sorted(paragraphs()) == ["nbd-server", "nbdkit", "qemu-nbd"]


@pytest.mark.parametrize("profile", ["qemu-nbd", "nbdkit", "nbd-server"])
def test_the_version_named_is_the_version_tested(profile):
    term, _ = paragraphs()[profile]
    named = " ".join(term.split()[:2])
    assert report(profile)["version"].startswith(named), (term, report(profile)["version"])


@pytest.mark.parametrize("profile", ["qemu-nbd", "nbdkit", "nbd-server"])
def test_every_check_the_prose_cites_has_the_verdict_it_describes(profile):
    _, text = paragraphs()[profile]
    cited = 0
    for sentence in re.split(r"(?<=[.;:])\s+", text):
        for name in CHECK.findall(sentence):
            cited += 1
            verdicts = outcomes(profile, name)
            assert verdicts, f"{profile}: {name} is not in docs/matrix/{profile}.json"
            if re.search(r"now and then|intermittent", sentence):
                # A race: the known deviation shows in some runs only (xpassed in the others).
                assert verdicts & (NOT_PASSING | {"xpassed"}), f"{profile}: {name}: {verdicts}"
            elif re.search(r"\bpasses\b", sentence):
                assert verdicts == {"passed"}, (
                    f"{profile}: the prose says {name} passes: {verdicts}"
                )
            else:
                assert verdicts & NOT_PASSING, (
                    f"{profile}: the prose cites {name}, which {verdicts}"
                )
    assert cited, f"the {profile} paragraph cites no check"


def test_no_check_id_is_part_of_a_module_name():
    """The rerun commands select a check with ``-k ID``, which also matches module names."""
    modules = [p.name for p in (REPO / "conformance").glob("test_*.py")]
    ids = [c["id"] for c in report("reference")["checks"]]
    assert not [(i, m) for i in ids for m in modules if i.lower() in m.lower()]
