"""The matrix page's HTML: its structure, read back with a small DOM built by html.parser."""

from __future__ import annotations

import pytest

from conformance.matrix import render
from tests.matrix_dom import parse
from tests.matrix_samples import A, B, C, sample_matrix


@pytest.fixture
def matrix():
    return sample_matrix()


@pytest.fixture
def dom(matrix):
    return parse(render.render(matrix))


def test_one_column_per_server_with_its_version(dom):
    heads = dom.find_all("th", "server")
    assert [h.find_all("b")[0].text() for h in heads] == ["reference", "nbd-server"]
    cards = dom.find_all("li", "server")
    assert "nbd-reference-server 0.1.0" in cards[0].text()
    assert "version unknown" in cards[1].text()


def test_rows_grouped_by_section_with_level(dom):
    sections = dom.find_all("tbody", "section")
    assert [s.find_all("th", "sec")[0].text() for s in sections] == [
        "TLS support",
        "Values / Option types",
    ]
    rows = sections[1].find_all("tr", "row")
    assert [r.find_all("td", "check")[0].text() for r in rows] == [
        "test_abort_gets_ackMUSTbaseline",
        "test_read_returns_what_was_written[one-byte]MUSTbaseline",
    ]


def test_cells_are_coloured_by_verdict_and_unknown_ones_fall_back(dom):
    classes = [c.classes[1] for c in dom.find_all("td", "cell")]
    assert classes == ["o-passed", "o-other", "o-passed", "o-failed", "o-passed", "o-passed"]
    legend = dom.find_all("p", "legend")[0].text()
    for label in ("passed", "failed", "warning", "known deviation", "unsupported", "skipped"):
        assert label in legend
    assert "brand-new-verdict" in legend


def test_a_failed_cell_opens_onto_sentence_message_evidence_and_rerun(dom):
    details = [
        d
        for d in dom.find_all("details")
        if d.attrs.get("id") == "c:nbd-server:test_abort_gets_ack"
    ]
    assert len(details) == 1
    detail = details[0]
    assert detail.find_all("blockquote")[0].text() == "The server MUST reply with `NBD_REP_ACK`."
    assert detail.find_all("pre", "message")[0].text() == "closed without <NBD_REP_ACK>"
    assert detail.find_all("pre", "evidence")[0].text() == "C: OPT_ABORT\nS: EOF"
    assert detail.find_all("pre", "rerun")[0].text() == (
        "nbd-conformance --nbd-server=nbd-server -k test_abort_gets_ack"
    )


def test_passed_cells_have_no_message_or_evidence(dom):
    detail = next(
        d for d in dom.find_all("details") if d.attrs.get("id") == "c:reference:test_abort_gets_ack"
    )
    assert not detail.find_all("pre", "message") and not detail.find_all("pre", "evidence")
    assert detail.find_all("pre", "rerun")


def test_rows_carry_what_the_filters_need(dom):
    rows = {r.find_all("td", "check")[0].attrs["title"]: r.attrs for r in dom.find_all("tr", "row")}
    assert rows[A] == {"class": "row", "data-failure": "1", "data-differs": "1"}
    assert rows[B] == {"class": "row", "data-failure": "0", "data-differs": "0"}
    # A verdict the page does not know is shown among the failures rather than hidden.
    assert rows[C]["data-failure"] == "1"
    options = [o.text() for o in dom.find_all("option")]
    assert options == ["all", "TLS support (1)", "Values / Option types (2)"]


def test_set_badges_per_server(dom):
    badges = [(b.attrs["data-set"], b.attrs["data-status"]) for b in dom.find_all("span", "set")]
    # Most features have no check in this small matrix: undetermined, never "met".
    assert badges == [
        ("Baseline", "undetermined"),
        ("Maximum interoperability", "undetermined"),
        ("Baseline", "not met"),
        ("Maximum interoperability", "undetermined"),
    ]


def test_the_page_is_self_contained(matrix):
    page = render.render(matrix)
    root = parse(page)
    assert not root.find_all("link") and not root.find_all("img")
    assert all("src" not in s.attrs for s in root.find_all("script"))
    assert "http://" not in page and "https://" not in page
    # Messages are text, never markup.
    assert "<NBD_REP_ACK>" not in page


def test_filters_are_hidden_until_the_script_shows_them(dom):
    form = dom.find_all("form")[0]
    assert form.attrs["id"] == "filters" and "hidden" in form.attrs


@pytest.mark.parametrize(
    ("outcome", "css", "failure", "shown"),
    [
        ("passed", "o-passed", False, "passed"),
        ("xfailed", "o-xfailed", True, "known deviation"),
        ("not-run: writes", "o-not-run", False, "not run (not-run: writes)"),
        ("server-gone", "o-server-gone", True, "server gone"),
        ("notrun", "o-other", True, "notrun"),
    ],
)
def test_variants_of_a_verdict_look_like_it(outcome, css, failure, shown):
    assert render.css_class(outcome) == css
    assert render.is_failure(outcome) is failure
    assert render.label(outcome) == shown


def test_the_card_says_how_the_server_was_started():
    matrix = sample_matrix()
    matrix["servers"][0]["configuration"] = "nbdkit -U SOCK memory SIZE"
    card = parse(render.render(matrix)).find_all("li", "server")[0]
    assert "started as nbdkit -U SOCK memory SIZE" in card.text()


def test_a_set_not_met_says_why_in_plain_sight(dom):
    cards = dom.find_all("li", "server")
    assert not cards[0].find_all("ul", "reasons")
    reasons = [li.text() for li in cards[1].find_all("ul", "reasons")[0].find_all("li")]
    assert reasons == [
        "Baseline not met: the `NBD_OPT_ABORT` message, and its response. "
        "-- failing: test_abort_gets_ack"
    ]
    marks = [m.attrs["title"] for m in dom.find_all("th", "server")[1].find_all("span", "mark")]
    assert marks == ["Baseline: not met", "Maximum interoperability: undetermined"]
