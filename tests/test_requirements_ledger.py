"""The requirement ledger stays true to the spec and to the suite (issue 11, points 1 and 2).

The first half tests the machinery on small made-up documents and ledgers
(so a broken extractor or audit cannot pass by finding nothing); the second
half runs it on the repository: every key-word sentence of docs/spec/proto.md
and of the EXTENDED_HEADERS extension is classified exactly once, every check
the ledger names exists, every quote is recorded against its entry, levels
agree.  A new spec revision with a new MUST fails here until someone
classifies the sentence (``python -m conformance.requirements.draft``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conformance.requirements import audit, coverage, draft, extract, ledger
from conformance.requirements.checks import Check, suite_checks
from conformance.requirements.ledger import Entry, Status

# ----------------------------------------------------------- the extractor

DOC = """\
# Title

## Conventions

The key words "MUST" and "MAY" are as in RFC 2119.

## Transmission

The server MUST reply. The client
MAY wait, e.g. for a `NBD_CMD.READ` reply. Nothing here.

* `NBD_CMD_READ` (0)

    A read. The server MUST NOT
    send more than *length* bytes.

    - nested item; SHOULD be rare

Back at the heading: the server SHOULD NOT stall.

### Flags

- bit 0, `NBD_FLAG_HAS_FLAGS`: MUST always be 1.
S: 64 bits, cookie (MUST match the request)
"""


def test_sentences_carry_their_heading_path_and_item():
    found = [(s.section, s.text) for s in extract.normative(DOC)]
    assert found == [
        ("Conventions", 'The key words "MUST" and "MAY" are as in RFC 2119.'),
        ("Transmission", "The server MUST reply."),
        ("Transmission", "The client MAY wait, e.g. for a `NBD_CMD.READ` reply."),
        ("Transmission / NBD_CMD_READ", "The server MUST NOT send more than *length* bytes."),
        ("Transmission / NBD_CMD_READ", "nested item; SHOULD be rare"),
        ("Transmission", "Back at the heading: the server SHOULD NOT stall."),
        (
            "Transmission / Flags / NBD_FLAG_HAS_FLAGS",
            "bit 0, `NBD_FLAG_HAS_FLAGS`: MUST always be 1.",
        ),
        ("Transmission / Flags", "S: 64 bits, cookie (MUST match the request)"),
    ]


def test_line_numbers_point_at_the_block():
    first = extract.normative(DOC)[1]
    assert DOC.splitlines()[first.line - 1].startswith("The server MUST reply.")


def test_key_words_are_upper_case_and_outside_code_spans():
    assert extract.key_words("the server must `MUST` not") == []
    assert extract.key_words("MUST NOT, then SHALL and\nSHOULD   NOT, OPTIONAL") == [
        "MUST NOT",
        "SHALL",
        "SHOULD NOT",
        "OPTIONAL",
    ]
    assert extract.key_words("MUSTARD MAYBE") == []
    assert extract.key_words("a mandatory condition ('MUST' etc.) MAY") == ["MAY"]
    assert extract.key_words("the words \"MUST\" and 'MAY'", mentions=True) == ["MUST", "MAY"]


def test_sentences_split_at_full_stops_but_not_abbreviations_or_code():
    text = "One, i.e. the first. Two (`a. B`). Three? `Four` ends."
    assert extract.split_sentences(text) == [
        "One, i.e. the first.",
        "Two (`a. B`).",
        "Three?",
        "`Four` ends.",
    ]


def test_the_extension_contributes_only_its_own_sentences():
    proto = "# T\n\n## A\n\nThe server MUST reply.\n"
    extended = "# T\n\n## A\n\nThe server MUST reply.\n\n## B\n\nIt MUST NOT wait.\n"
    found = extract.classifiable(proto, extended)
    assert [(c.source, c.sentence.section) for c in found] == [("proto", "A"), ("extension", "B")]


def test_a_repeated_sentence_is_numbered():
    doc = "# T\n\n## A\n\nIt MUST be 2.\n\nIt MUST be 2.\n"
    assert [c.occurrence for c in extract.classifiable(doc)] == [1, 2]


def test_the_real_spec_yields_hundreds_of_sentences():
    found = extract.spec_classifiable()
    assert len([c for c in found if c.source == "proto"]) > 350
    assert len([c for c in found if c.source == "extension"]) > 40


# ---------------------------------------------------------------- the draft


def test_a_sentence_mixing_levels_is_split_into_verbatim_parts():
    text = "The client SHOULD ignore them, while the server MUST close the connection."
    assert draft.split_parts(text) == [
        "The client SHOULD ignore them",
        "the server MUST close the connection.",
    ]
    assert draft.split_parts("The server MUST do A and MUST do B.") == [
        "The server MUST do A and MUST do B."
    ]


def test_draft_ids_are_slugs_of_section_and_words():
    assert draft.area_slug("Values / Transmission phase / Request types / NBD_CMD_READ") == (
        "cmd.read"
    )
    assert draft.mnemonic("The server MUST NOT send `NBD_REP_ACK` twice.") == (
        "server-must-not-send-nbd_rep_ack-twice"
    ).replace("_", "-")


def test_a_draft_entry_round_trips_through_toml(tmp_path: Path):
    doc = "# T\n\n## Transmission\n\nThe client SHOULD wait, and the server MUST reply.\n"
    drafts = draft.draft_entries(extract.classifiable(doc), [], set())
    (tmp_path / "x.toml").write_text("\n".join(draft.toml_entry(d) for d in drafts))
    entries = ledger.load(tmp_path)
    assert [(e.level, e.binds, e.status) for e in entries] == [
        ("SHOULD", "client", Status.CLIENT_ONLY),
        ("MUST", "server", Status.UNCHECKED),
    ]
    assert audit.sentence_problems(entries, extract.classifiable(doc)) == []
    # A draft is not a classification: the audit says so.
    assert any("still a draft" in p for p in audit.entry_problems(entries))


# ---------------------------------------------------------------- the audit


def _entry(**fields: object) -> Entry:
    values: dict[str, object] = {
        "id": "tx.server-must-reply",
        "section": "Transmission",
        "sentence": "The server MUST reply.",
        "level": "MUST",
        "binds": "server",
        "status": Status.CHECKED,
        "file": "t.toml",
        "checks": ("test_reply",),
    }
    values.update(fields)
    return Entry(**values)  # type: ignore[arg-type]


def _check(**fields: object) -> Check:
    values: dict[str, object] = {
        "name": "test_reply",
        "file": "conformance/test_x.py",
        "line": 1,
        "section": "Transmission",
        "level": "MUST",
        "quote": "The server MUST reply.",
    }
    values.update(fields)
    return Check(**values)  # type: ignore[arg-type]


def test_a_well_formed_entry_has_no_problem():
    assert audit.entry_problems([_entry()]) == []
    assert audit.check_problems([_entry()], [_check()], {}) == []


@pytest.mark.parametrize(
    "fields,problem",
    [
        ({"level": "SHOULD"}, "its text says"),
        ({"level": "must"}, "is not one of"),
        ({"binds": "servers"}, "binds 'servers'"),
        ({"id": "Tx.1 2"}, "lower-case"),
        ({"status": Status.CHECKED, "checks": ()}, "names no check"),
        ({"status": Status.UNCHECKED}, "but it names checks"),
        ({"status": Status.UNTESTABLE, "checks": ()}, "needs a 'reason'"),
        ({"status": Status.PARTIAL, "checks": (), "partial": ("test_reply",)}, "partial wants"),
        ({"miscited": ("test_x",)}, "need a 'note'"),
        ({"part": "The client MUST"}, "not a verbatim piece"),
        ({"status": Status.CLIENT_ONLY, "checks": (), "reason": "r"}, "client-only, but"),
        ({"binds": "client", "status": Status.UNCHECKED, "checks": ()}, "binds only the client"),
        ({"sentence": "The server MUST reply, or MAY not."}, "mixes levels"),
        ({"status": Status.INFORMATIVE, "checks": (), "reason": "r"}, "needs level informative"),
    ],
)
def test_a_malformed_entry_is_named(fields: dict[str, object], problem: str):
    problems = audit.entry_problems([_entry(**fields)])
    assert any(problem in p for p in problems), problems


def test_an_id_used_twice_is_named():
    assert any("used twice" in p for p in audit.entry_problems([_entry(), _entry()]))


def test_sentences_missing_from_or_unknown_to_the_ledger_are_named():
    doc = "# T\n\n## Transmission\n\nThe server MUST reply.\n\nThe server MUST NOT stall.\n"
    spec = extract.classifiable(doc)
    problems = audit.sentence_problems([_entry()], spec)
    assert len(problems) == 1
    assert "not in the ledger" in problems[0] and "stall" in problems[0]
    stale = _entry(id="tx.old", sentence="The server MUST answer.")
    assert any("no such key-word sentence" in p for p in audit.sentence_problems([stale], spec))


def test_a_sentence_classified_twice_needs_distinct_parts():
    doc = "# T\n\n## Transmission\n\nThe server MUST reply.\n"
    twice = [_entry(), _entry(id="tx.again")]
    assert any(
        "classified 2 times" in p for p in audit.sentence_problems(twice, extract.classifiable(doc))
    )
    split = [
        _entry(sentence="The server MUST reply, and MUST NOT stall.", part="The server MUST reply"),
        _entry(
            id="tx.no-stall",
            sentence="The server MUST reply, and MUST NOT stall.",
            part="MUST NOT stall.",
            level="MUST NOT",
        ),
    ]
    doc = "# T\n\n## Transmission\n\nThe server MUST reply, and MUST NOT stall.\n"
    assert audit.sentence_problems(split, extract.classifiable(doc)) == []
    assert audit.entry_problems(split) == []


def test_check_problems_name_each_disagreement():
    entry = _entry()
    assert any("no check of the suite" in p for p in audit.check_problems([entry], [], {}))
    assert any(
        "no ledger entry names it" in p
        for p in audit.check_problems(
            [entry], [_check(), _check(name="test_other", quote=None)], {}
        )
    )
    assert (
        audit.check_problems(
            [entry], [_check(), _check(name="test_other", quote=None)], {"test_other": "fuzz"}
        )
        == []
    )
    quoting = _check(name="test_quoting")
    problems = audit.check_problems([entry], [_check(), quoting], {"test_quoting": "x"})
    assert any("in unmapped.toml, yet its quote is" in p for p in problems)
    prose = _check(name="test_prose", quote="The server replies.")
    assert audit.check_problems([entry], [_check(), prose], {"test_prose": "no key word"}) == []
    problems = audit.check_problems([entry], [_check(), quoting], {})
    assert any("quotes tx.server-must-reply but no entry" in p for p in problems)
    problems = audit.check_problems([entry], [_check(level="SHOULD")], {})
    assert any("tagged SHOULD, but tests" in p for p in problems)
    miscited = _entry(checks=(), status=Status.UNCHECKED, miscited=("test_reply",), note="n")
    assert audit.check_problems([miscited], [_check(level="SHOULD")], {}) == []
    problems = audit.check_problems([entry], [_check(quote="The server MUST answer.")], {})
    assert any("quote is no key-word sentence of the ledger" in p for p in problems)


def test_a_quote_picks_the_part_it_overlaps():
    sentence = "The server MUST reply, and MUST NOT stall."
    reply = _entry(sentence=sentence, part="The server MUST reply")
    stall = _entry(id="tx.stall", sentence=sentence, part="MUST NOT stall.", level="MUST NOT")
    check = _check(quote="MUST NOT stall")
    assert audit.quote_targets(check, [reply, stall]) == [stall]
    spanning = _check(quote="Nothing. " + sentence + " More.")
    assert audit.quote_targets(spanning, [reply, stall]) == [reply, stall]


def test_coverage_counts_testable_entries_per_level():
    entries = [
        _entry(),
        _entry(id="b", status=Status.PARTIAL, checks=(), partial=("t",), note="n"),
        _entry(id="c", status=Status.UNCHECKED, checks=()),
        _entry(id="d", status=Status.UNTESTABLE, checks=(), reason="storage"),
        _entry(id="e", level="SHOULD", status=Status.UNCHECKED, checks=()),
    ]
    rows = {r.level: (r.checked, r.partial, r.unchecked) for r in coverage.coverage(entries)}
    assert rows == {"MUST": (1, 1, 1), "SHOULD": (0, 0, 1)}
    lines = coverage.coverage_lines(entries)
    assert "1 untestable" in lines[-1]


# ------------------------------------------------------ the real ledger

ENTRIES = ledger.load()
CHECKS, UNREADABLE = suite_checks()


def test_the_suite_can_be_read():
    assert UNREADABLE == []
    assert len(CHECKS) > 100


def test_every_key_word_sentence_is_in_the_ledger_exactly_once():
    assert audit.sentence_problems(ENTRIES, extract.spec_classifiable()) == []


def test_a_new_key_word_sentence_in_the_spec_is_caught():
    """What a new spec revision with a new MUST does: the ledger test names it."""
    proto = extract.PROTO.read_text() + "\n## A new section\n\nThe server MUST frobnicate.\n"
    extension = extract.EXTENSION.read_text()
    problems = audit.sentence_problems(ENTRIES, extract.classifiable(proto, extension))
    assert len(problems) == 1
    assert "not in the ledger" in problems[0] and "frobnicate" in problems[0]


def test_a_reworded_sentence_in_the_spec_is_caught():
    proto = extract.PROTO.read_text().replace(
        "The server MUST reply with `NBD_REP_ACK`.",
        "The server MUST reply with `NBD_REP_ACK` at once.",
    )
    extension = extract.EXTENSION.read_text()
    problems = audit.sentence_problems(ENTRIES, extract.classifiable(proto, extension))
    assert any("at once" in p for p in problems)
    assert any("no such key-word sentence" in p for p in problems)


def test_every_entry_is_well_formed():
    assert audit.entry_problems(ENTRIES) == []


def test_the_ledger_and_the_checks_agree():
    assert audit.check_problems(ENTRIES, CHECKS, ledger.load_unmapped()) == []


def test_every_testable_server_entry_has_a_check_or_is_on_the_todo_list():
    """Status ``unchecked`` is the explicit to-do list; anything else testable names checks."""
    for entry in ENTRIES:
        if entry.testable and entry.status is not Status.UNCHECKED:
            assert entry.checks or entry.partial, entry.id
        if entry.binds in ("server", "both") and not entry.testable:
            assert entry.status is not Status.CLIENT_ONLY, entry.id


def test_the_coverage_figures_add_up():
    rows = coverage.coverage(ENTRIES)
    testable = [e for e in ENTRIES if e.testable]
    assert sum(r.total for r in rows) == len(testable)
    assert sum(r.checked for r in rows) == sum(e.status is Status.CHECKED for e in testable)


def test_entries_are_frozen_data():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ENTRIES[0].level = "MAY"  # type: ignore[misc]
