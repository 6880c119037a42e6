"""The traceability page, generated from the requirement ledger and the checks' tags."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from docutils import nodes
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from .common import (
    EXT_SPEC,
    REPO,
    SPEC,
    _para,
    _table,
)
from .spec import Heading, resolve, spec_headings

# The requirement ledger and the static reader of the checks live with the
# suite (conformance/requirements/); they import neither pytest nor libnbd.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from conformance.requirements.audit import all_problems as ledger_problems
from conformance.requirements.checks import Check
from conformance.requirements.checks import suite_checks as _suite_checks
from conformance.requirements.coverage import coverage as ledger_coverage
from conformance.requirements.ledger import LEDGER_DIR, Entry, Status, load_unmapped
from conformance.requirements.ledger import load as load_ledger

logger = logging.getLogger(__name__)


def suite_checks(directory: Path) -> tuple[list[Check], list[str]]:
    """Every ``@spec(...)``-tagged check in DIRECTORY/test_*.py, by static analysis."""
    return _suite_checks(directory)


def _flat(text: str) -> str:
    return " ".join(text.replace("`", "").split())


def quote_problems(
    checks: list[Check], headings: list[Heading], extension: list[Heading]
) -> Iterator[str]:
    """Checks whose quote is not a sentence of the section they cite.

    A quote is compared without Markdown backticks and with whitespace
    collapsed; the section's text includes its subsections.
    """
    for check in checks:
        if not check.quote:
            continue
        quote = _flat(check.quote)
        # The section may exist in both documents, the sentence only in the
        # EXTENDED_HEADERS extension's version of it.
        cited = [resolve(check.section, document)[0] for document in (headings, extension)]
        if any(heading is not None and quote in _flat(heading.text) for heading in cited):
            continue
        holders = [h for h in headings + extension if quote in _flat(h.text)]
        where = f"{check.file}:{check.line}: {check.name}"
        if not holders:
            yield f"{where}: its quote is not in the specification: {check.quote!r}"
        else:
            deepest = max(holders, key=lambda h: len(h.path))
            yield (
                f"{where}: cites {check.section!r}, but its quote is from "
                f"{deepest.title!r}: {check.quote!r}"
            )


def _heading_of(entry: Entry, titles: dict[str, float]) -> str:
    """The Markdown heading an entry is under: its section without any named item."""
    parts = entry.section.split(" / ")
    while len(parts) > 1 and " / ".join(parts) not in titles:
        parts.pop()
    return " / ".join(parts)


def _figures(entries: list[Entry]) -> list[str]:
    testable = [e for e in entries if e.testable]
    return [
        str(len(entries)),
        str(len(testable)),
        str(sum(e.status is Status.CHECKED for e in testable)),
        str(sum(e.status is Status.PARTIAL for e in testable)),
        str(sum(e.status is Status.UNCHECKED for e in testable)),
        str(len(entries) - len(testable)),
    ]


def _entry_item(entry: Entry) -> nodes.list_item:
    """One entry: ID, level, binds, status, why, the sentence and the checks."""
    head = _para(
        nodes.literal(text=entry.id),
        f" ({entry.level}, {entry.binds}"
        + (", from the extension" if entry.source == "extension" else "")
        + f"): {entry.status.value}",
    )
    if entry.reason:
        head += nodes.Text(f": {entry.reason}")
    item = nodes.list_item("", head)
    item += nodes.block_quote("", _para(entry.text))
    for label, names in (
        ("tested in full by", entry.checks),
        ("tested in part by", entry.partial),
        ("quoted by, not tested by", entry.miscited),
    ):
        if names:
            para = _para(f"{label} ")
            for n, name in enumerate(names):
                para += nodes.Text(", " if n else "")
                para += nodes.literal(text=name)
            item += para
    if entry.note:
        item += _para(nodes.emphasis(text=entry.note))
    return item


class TraceabilityDirective(SphinxDirective):
    """The requirement ledger: coverage per level and per section, and what is not checked."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        for path in [*sorted(LEDGER_DIR.glob("*.toml")), SPEC, EXT_SPEC]:
            self.env.note_dependency(str(path))
        if not SPEC.exists():
            logger.warning(
                "the specification is missing: expected %s (the repository's "
                "docs/spec/proto.md); the traceability page cannot be generated",
                SPEC,
                location=self.get_location(),
            )
            return [_para(nodes.strong(text=f"The specification ({SPEC}) was not found."))]
        self._check_citations()
        entries = load_ledger()
        checks, _ = suite_checks(REPO / "conformance")
        for problem in ledger_problems(entries, checks):
            logger.warning("requirement ledger: %s", problem, location=self.get_location())
        result: list[nodes.Node] = [self._summary(entries, checks)]
        result.append(nodes.rubric(text="Coverage per level"))
        rows = [
            [
                _para(row.level),
                _para(str(row.total)),
                _para(str(row.checked)),
                _para(str(row.partial)),
                _para(str(row.unchecked)),
            ]
            for row in ledger_coverage(entries)
        ]
        result.append(
            _table(
                ["Level", "Testable (server)", "Checked", "In part", "Not yet"],
                rows,
                [20, 20, 20, 20, 20],
            )
        )
        # Headings in proto.md's order, the extension's own after the heading
        # they follow in its copy.
        titles: dict[str, float] = {h.title: n for n, h in enumerate(spec_headings(SPEC))}
        previous = -1.0
        for heading in spec_headings(EXT_SPEC) if EXT_SPEC.exists() else []:
            previous = titles.setdefault(heading.title, previous + 0.01)
        grouped: dict[str, list[Entry]] = {}
        for entry in entries:
            grouped.setdefault(_heading_of(entry, titles), []).append(entry)
        groups = dict(sorted(grouped.items(), key=lambda kv: titles.get(kv[0], len(titles))))
        result.append(nodes.rubric(text="Coverage per section"))
        rows = [
            [_para(nodes.literal(text=heading)), *(_para(f) for f in _figures(group))]
            for heading, group in groups.items()
        ]
        result.append(
            _table(
                ["Section", "Entries", "Testable", "Checked", "In part", "Not yet", "Other"],
                rows,
                [40, 10, 10, 10, 10, 10, 10],
            )
        )
        result.append(nodes.rubric(text="Section by section: what is not checked, and why"))
        for heading, group in groups.items():
            section = nodes.section(ids=[nodes.make_id("ledger-" + heading)])
            section += nodes.title(text=heading)
            checked = [e for e in group if e.status is Status.CHECKED]
            others = [e for e in group if e.status is not Status.CHECKED]
            summary = f"{len(group)} entries, {len(checked)} checked in full."
            section += _para(summary)
            if others:
                section += nodes.bullet_list("", *(_entry_item(e) for e in others))
            if checked:
                section += _para("Checked in full:")
                section += nodes.bullet_list("", *(_entry_item(e) for e in checked))
            result.append(section)
        result += self._miscited(entries)
        result += self._unmapped(checks)
        return result

    def _miscited(self, entries: list[Entry]) -> list[nodes.Node]:
        """Checks whose ``quote=`` names a sentence they do not test: the lead's fix list."""
        items = nodes.bullet_list()
        for entry in entries:
            for name in entry.miscited:
                items += nodes.list_item(
                    "",
                    _para(
                        nodes.literal(text=name),
                        " quotes ",
                        nodes.literal(text=entry.id),
                        f" ({entry.level}): {entry.note}",
                    ),
                )
        if not len(items):
            return []
        return [nodes.rubric(text="Checks that quote a sentence they do not test"), items]

    def _summary(self, entries: list[Entry], checks: list[Check]) -> nodes.Node:
        testable = [e for e in entries if e.testable]
        miscited = sum(len(e.miscited) for e in entries)
        return _para(
            f"{len(entries)} entries classify the key-word sentences of proto.md and of the "
            f"EXTENDED_HEADERS extension ({sum(e.source == 'extension' for e in entries)} "
            f"from the extension). {len(testable)} are requirements on the server a check "
            f"could test from the wire: {sum(e.status is Status.CHECKED for e in testable)} "
            f"are checked in full, {sum(e.status is Status.PARTIAL for e in testable)} in "
            f"part, {sum(e.status is Status.UNCHECKED for e in testable)} not yet. The suite "
            f"has {len(checks)} checks; {miscited} times a check quotes a sentence it does "
            "not test (listed under the entry as 'quoted by, not tested by')."
        )

    def _unmapped(self, checks: list[Check]) -> list[nodes.Node]:
        unmapped = load_unmapped()
        if not unmapped:
            return []
        items = nodes.bullet_list()
        files = {c.name: c.file for c in checks}
        for name, reason in sorted(unmapped.items()):
            items += nodes.list_item(
                "",
                _para(nodes.literal(text=name), f" ({files.get(name, '?')}): {reason}"),
            )
        return [nodes.rubric(text="Checks that test no key-word sentence"), items]

    def _check_citations(self) -> None:
        """Every check's section is a heading of the spec, and its quote a sentence of it."""
        headings = spec_headings(SPEC)
        extension = spec_headings(EXT_SPEC) if EXT_SPEC.exists() else []
        checks, problems = suite_checks(REPO / "conformance")
        for problem in problems:
            logger.warning(problem, location=self.get_location())
        for check in checks:
            heading, item = resolve(check.section, headings)
            if heading is None:
                heading, _ = resolve(check.section, extension)
            if heading is None:
                logger.warning(
                    "%s:%d: %s cites %r, which is no heading of proto.md (%s)",
                    check.file,
                    check.line,
                    check.name,
                    check.section,
                    item,
                    location=self.get_location(),
                )
        for problem in quote_problems(checks, headings, extension):
            logger.warning(problem, location=self.get_location())
