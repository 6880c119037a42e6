"""Local Sphinx extension: keeps the documentation honest about the code.

At build time it

* checks that every option of the reference server's argparse parser, and
  every option the conformance plugin adds to pytest, is documented with an
  ``.. option::`` directive on its manual page, and that no documented option
  has disappeared from the code;
* runs ``docs/traces/capture.py --check``: the protocol tour's captured
  exchanges must match what the reference server does now;
* generates the traceability page (``.. nbd-traceability::``) from the
  requirement ledger (``conformance/requirements/*.toml``), after checking it
  against the key-word sentences of ``docs/spec/proto.md`` and the
  ``@spec(...)`` tags of the conformance checks, found by static analysis
  (the suite is never imported);
* renders the findings page (``.. nbd-findings::``) from ``reports/*.json``;
* draws the state diagrams of the architecture page (``.. nbd-state-diagram::
  MODULE[:TABLE]``) from the transition tables in the code, and checks that
  each transition cites a heading of the specification.

Every problem is a Sphinx warning, so ``sphinx-build -W`` (``tox -e docs``)
fails on it.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

DOCS = Path(__file__).resolve().parents[1]
REPO = DOCS.parent
# The requirement ledger and the static reader of the checks live with the
# suite (conformance/requirements/); they import neither pytest nor libnbd.
sys.path.insert(0, str(REPO))
from conformance.requirements.audit import all_problems as ledger_problems  # noqa: E402
from conformance.requirements.checks import Check  # noqa: E402
from conformance.requirements.checks import suite_checks as _suite_checks  # noqa: E402
from conformance.requirements.coverage import coverage as ledger_coverage  # noqa: E402
from conformance.requirements.ledger import LEDGER_DIR, Entry, Status, load_unmapped  # noqa: E402
from conformance.requirements.ledger import load as load_ledger  # noqa: E402

SPEC = DOCS / "spec" / "proto.md"
EXT_SPEC = DOCS / "spec" / "proto-extension-ext-header.md"
SERVER_PAGE = "tools/nbd-reference-server"
SUITE_PAGE = "tools/nbd-conformance"
# Pages whose content comes from outside docs/: re-read on every build.
DYNAMIC_PAGES = ("traceability", "findings")
TRACE_CHECK_TIMEOUT = 300
# Options the nbd-conformance page documents that pytest (--strict) and
# pytest-xdist (-n) own, not the suite's plugin.
PYTEST_OWN_OPTIONS = {"--strict", "-n"}


# ------------------------------------------------------------ the options


def server_options() -> dict[str, str]:
    """{option string: its help} for every argument of the reference server's CLI."""
    sys.path.insert(0, str(REPO))
    try:
        from reference_server.cli import build_parser
    finally:
        sys.path.remove(str(REPO))
    found: dict[str, str] = {}
    for action in build_parser()._actions:
        # A positional argument is documented under its name in capitals (FILENAME).
        names = list(action.option_strings) or [action.dest.upper()]
        for name in names:
            found[name] = action.help or ""
    return found


def _option_literals(path: Path) -> Iterator[str]:
    """Option strings passed to ``addoption``/``add_argument`` calls in PATH (ast)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("addoption", "add_argument", "_addoption")
        ):
            for arg in node.args:
                if (
                    isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)
                    and arg.value.startswith("-")
                ):
                    yield arg.value


def suite_options() -> set[str] | None:
    """Options the conformance plugin (and its ``nbd-conformance`` wrapper) adds."""
    sources = [REPO / "conformance" / "plugin.py", REPO / "conformance" / "cli.py"]
    present = [p for p in sources if p.exists()]
    if not (REPO / "conformance" / "plugin.py").exists():
        return None
    return {option for path in present for option in _option_literals(path)}


def check_options(app: Sphinx, env: BuildEnvironment) -> None:
    documented: dict[str, set[str]] = {}
    for (program, name), _target in env.get_domain("std").progoptions.items():  # type: ignore[attr-defined]
        documented.setdefault(program or "", set()).add(name)
    _compare("nbd-reference-server", SERVER_PAGE, set(server_options()), documented)
    suite = suite_options()
    if suite is None:
        logger.warning(
            "conformance/plugin.py not found: cannot check the options %s documents", SUITE_PAGE
        )
    else:
        _compare("nbd-conformance", SUITE_PAGE, suite | PYTEST_OWN_OPTIONS, documented)


def _compare(program: str, page: str, actual: set[str], documented: dict[str, set[str]]) -> None:
    have = documented.get(program, set())
    for option in sorted(actual - have):
        logger.warning(
            "%s option %s is not documented: add '.. option:: %s' to %s.rst",
            program,
            option,
            option,
            page,
            location=page,
        )
    for option in sorted(have - actual):
        logger.warning(
            "%s.rst documents %s %s, which the code no longer has",
            page,
            program,
            option,
            location=page,
        )


# ----------------------------------------------------------- the traces


def check_traces(app: Sphinx) -> None:
    """``capture.py --check``: the tour's exchanges must still be what the server does."""
    script = DOCS / "traces" / "capture.py"
    try:
        result = subprocess.run(
            [sys.executable, str(script), "--check"],
            capture_output=True,
            text=True,
            timeout=TRACE_CHECK_TIMEOUT,
            check=False,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        logger.warning("docs/traces/capture.py --check did not finish in %ss", TRACE_CHECK_TIMEOUT)
        return
    if result.returncode:
        logger.warning(
            "the captured protocol exchanges differ from the reference server's behaviour "
            "(docs/traces/capture.py --check):\n%s%s",
            result.stdout,
            result.stderr,
        )
    else:
        logger.info(result.stdout.strip())


# ------------------------------------------------------ the specification


@dataclasses.dataclass(frozen=True)
class Heading:
    path: tuple[str, ...]
    level: int
    line: int
    # The section's text, subsections included, without Markdown backticks.
    text: str = dataclasses.field(default="", compare=False, repr=False)

    @property
    def title(self) -> str:
        return " / ".join(self.path)


def spec_headings(path: Path) -> list[Heading]:
    """Every Markdown heading of PATH as a path below the document title."""
    lines = path.read_text().splitlines()
    found: list[tuple[tuple[str, ...], int, int]] = []  # path, level, index
    stack: list[str] = []
    fence: str | None = None
    for index, line in enumerate(lines):
        stripped = line.strip()
        if fence:
            if stripped.startswith(fence):
                fence = None
            continue
        if stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            continue
        match = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        level = len(match.group(1))
        if level == 1:  # the document's title is not part of a heading path
            stack = []
            found.append(((), 1, index))
            continue
        del stack[level - 2 :]
        stack.extend([""] * (level - 2 - len(stack)))
        stack.append(match.group(2))
        found.append((tuple(stack), level, index))
    headings: list[Heading] = []
    for n, (heading_path, level, index) in enumerate(found):
        if level == 1:
            continue
        end = next((i for p, lv, i in found[n + 1 :] if lv <= level), len(lines))
        text = "\n".join(lines[index + 1 : end]).replace("`", "")
        headings.append(Heading(heading_path, level, index + 1, text))
    return headings


def _norm(component: str) -> str:
    return " ".join(component.split()).casefold()


def split_path(section: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in section.split(" / ") if part.strip())


def resolve(section: str, headings: list[Heading]) -> tuple[Heading | None, str]:
    """The heading a citation names, and the item below it the citation names.

    Citations are heading paths; they may leave out leading components
    ("Transmission / Ordering of messages and writes") and may go on below
    the last heading to an item its text names ("... / Request types /
    NBD_CMD_READ").  The longest, unambiguous match wins.
    """
    original = split_path(section)
    cited = tuple(_norm(p) for p in original)
    for k in range(len(cited), 0, -1):
        head = cited[:k]
        matches = [h for h in headings if tuple(_norm(p) for p in h.path[-k:]) == head]
        if len(matches) > 1:
            exact = [h for h in matches if len(h.path) == k]
            if len(exact) != 1:
                return None, f"ambiguous: {', '.join(h.title for h in matches)}"
            matches = exact
        if matches:
            heading, rest = matches[0], original[k:]
            missing = [item for item in rest if item.replace("`", "") not in heading.text]
            if missing:
                return None, f"{heading.title!r} has no item {missing[0]!r}"
            return heading, " / ".join(rest)
    return None, "no such heading"


# -------------------------------------------------------------- the checks


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
        heading, _ = resolve(check.section, headings)
        if heading is None:
            heading, _ = resolve(check.section, extension)
        if heading is not None and quote in _flat(heading.text):
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


# --------------------------------------------------------- node building


def _para(*children: nodes.Node | str) -> nodes.paragraph:
    para = nodes.paragraph()
    for child in children:
        para += nodes.Text(child) if isinstance(child, str) else child
    return para


def _table(headers: list[str], rows: Iterable[list[nodes.Node]], widths: list[int]) -> nodes.table:
    table = nodes.table()
    group = nodes.tgroup(cols=len(headers))
    table += group
    for width in widths:
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    group += head
    row = nodes.row()
    for header in headers:
        row += nodes.entry("", _para(header))
    head += row
    body = nodes.tbody()
    group += body
    for cells in rows:
        row = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            entry += cell
            row += entry
        body += row
    return table


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


# ------------------------------------------------------------ the findings


def load_reports(directory: Path) -> list[tuple[Path, dict[str, Any] | None, str]]:
    reports = []
    for path in sorted(directory.glob("*.json")):
        try:
            document = json.loads(path.read_text())
            if isinstance(document, dict) and "servers" in document and "format" in document:
                continue  # the merged matrix written beside the reports (nbdmatrix.py)
            reports.append((path, document, ""))
        except (OSError, ValueError) as exc:
            reports.append((path, None, str(exc)))
    return reports


#: Outcomes worth a row on the findings page, worst first (conformance/report.py's names).
NOTABLE = ("error", "failed", "xpassed", "warning", "xfailed")
BUILT_IN = ("reference", "qemu-nbd", "nbdkit", "nbd-server")


class FindingsDirective(SphinxDirective):
    """What each ``reports/*.json`` (written by ``--report``) says, server by server."""

    has_content = False
    option_spec = {"reports": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        directory = REPO / self.options.get("reports", "reports")
        reports = load_reports(directory)
        for path, _, _ in reports:
            self.env.note_dependency(str(path))
        if not reports:
            return [
                _para(
                    nodes.emphasis(
                        text=f"No reports were in {directory.relative_to(REPO)}/ when these "
                        "pages were built: run the commands above, then build the docs again."
                    )
                )
            ]
        result: list[nodes.Node] = []
        for path, report, error in reports:
            result.append(nodes.rubric(text=path.name))
            if report is None or not isinstance(report.get("checks"), list):
                logger.warning(
                    "%s is not a conformance report: %s",
                    path,
                    error or "no 'checks' list",
                    location=self.get_location(),
                )
                continue
            result += self._report(report)
        return result

    def _report(self, report: dict[str, Any]) -> list[nodes.Node]:
        profile = str(report.get("profile", "?"))
        target = str(report.get("target", ""))
        if profile in BUILT_IN:
            command = f"./bootstrap tox -e {profile}"
        else:
            command = f"pytest conformance {target}"
        out: list[nodes.Node] = [
            _para(
                "Server: ",
                nodes.literal(text=target or profile),
                "; reproduce with ",
                nodes.literal(text=command),
                " (SHOULD-level failures counted as failures)."
                if report.get("strict")
                else " (SHOULD-level failures reported as warnings).",
            )
        ]
        summary = report.get("summary")
        if isinstance(summary, dict):
            out.append(
                _para(
                    "Totals: "
                    + ", ".join(
                        f"{value} {key}"
                        for key, value in summary.items()
                        if isinstance(value, int) and key != "exitstatus"
                    )
                    + "."
                )
            )
        checks = [c for c in report["checks"] if isinstance(c, dict)]
        notable = sorted(
            (c for c in checks if c.get("outcome") in NOTABLE),
            key=lambda c: (NOTABLE.index(c["outcome"]), str(c.get("id"))),
        )
        if not notable:
            out.append(_para("No failure, warning or known deviation."))
            return out
        rows = [
            [
                _para(nodes.literal(text=str(c.get("id", "?")))),
                _para(f"{c['outcome']} ({c.get('level', '?')})"),
                _para(str(c.get("section", ""))),
                _para(str(c.get("message", ""))),
            ]
            for c in notable
        ]
        out.append(_table(["Check", "Verdict", "Section", "Message"], rows, [25, 12, 23, 40]))
        return out


# ---------------------------------------------------------- state diagrams


def _is_table(value: object) -> bool:
    """Has the shape of ``reference_server.protocol.phases.TransitionTable``."""
    return all(hasattr(value, name) for name in ("title", "initial", "phases", "transitions"))


def transition_tables(target: str) -> list[Any]:
    """The tables ``MODULE:ATTRIBUTE`` names, or every table ``MODULE`` defines, in order."""
    module_name, _, attribute = target.partition(":")
    sys.path.insert(0, str(REPO))
    try:
        module = importlib.import_module(module_name)
    finally:
        sys.path.remove(str(REPO))
    if attribute:
        table = getattr(module, attribute, None)
        if not _is_table(table):
            raise ValueError(f"{target} is not a transition table")
        return [table]
    found: list[Any] = []
    for value in vars(module).values():
        if _is_table(value) and not any(value is t for t in found):
            found.append(value)
    if not found:
        raise ValueError(f"module {module_name} defines no transition table")
    return found


def _describe(member: Any) -> str:
    """An enum member's description: its value when that is text, else nothing."""
    value = getattr(member, "value", None)
    return value if isinstance(value, str) else ""


def state_diagram(table: Any) -> str:
    """A text drawing of TABLE: each phase, and the arrows that leave it."""
    rows = list(table.transitions)
    width = max((len(r.trigger.name) for r in rows), default=0)
    entered = {r.target for r in rows}
    lines: list[str] = []
    for phase in table.phases:
        notes = []
        if phase == table.initial:
            notes.append("initial")
        if not any(r.source == phase for r in rows):
            notes.append("final")
        if phase != table.initial and phase not in entered:
            notes.append("never entered")
        lines.append(phase.name + (f"  ({', '.join(notes)})" if notes else ""))
        leaving = [r for r in rows if r.source == phase]
        for n, row in enumerate(leaving):
            branch = "`--" if n == len(leaving) - 1 else "|--"
            lines.append(f"  {branch} {row.trigger.name.ljust(width)} --> {row.target.name}")
    return "\n".join(lines)


class StateDiagramDirective(SphinxDirective):
    """A transition table of the code, drawn, listed, and checked against the spec."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        target = self.arguments[0]
        try:
            tables = transition_tables(target)
        except (ImportError, ValueError) as exc:
            logger.warning("nbd-state-diagram %s: %s", target, exc, location=self.get_location())
            return [_para(nodes.strong(text=f"No transition table at {target}."))]
        module = sys.modules[target.partition(":")[0]]
        if module.__file__:
            self.env.note_dependency(module.__file__)
        self.env.note_dependency(str(SPEC))
        headings = spec_headings(SPEC) if SPEC.exists() else []
        extension = spec_headings(EXT_SPEC) if EXT_SPEC.exists() else []
        result: list[nodes.Node] = []
        for table in tables:
            result += self._render(table, headings, extension)
        return result

    def _render(
        self, table: Any, headings: list[Heading], extension: list[Heading]
    ) -> list[nodes.Node]:
        phases = nodes.definition_list()
        for phase in table.phases:
            item = nodes.definition_list_item()
            item += nodes.term("", "", nodes.literal(text=phase.name))
            item += nodes.definition("", _para(_describe(phase)))
            phases += item
        rows = []
        for row in table.transitions:
            heading, _ = resolve(row.section, headings)
            if heading is None:
                heading, _ = resolve(row.section, extension)
            if heading is None:
                logger.warning(
                    "%s transition %s + %s cites %r, which is no heading of the specification",
                    table.title,
                    row.source.name,
                    row.trigger.name,
                    row.section,
                    location=self.get_location(),
                )
            rows.append(
                [
                    _para(nodes.literal(text=row.source.name)),
                    _para(nodes.literal(text=row.trigger.name), f": {_describe(row.trigger)}"),
                    _para(nodes.literal(text=row.target.name)),
                    _para(row.section),
                ]
            )
        diagram = nodes.literal_block(text=state_diagram(table))
        return [
            nodes.rubric(text=f"The {table.title} phases"),
            phases,
            diagram,
            _table(["From", "Trigger", "To", "Spec (heading path)"], rows, [18, 37, 15, 30]),
        ]


# --------------------------------------------------------------- man pages


class PlainInternalLinks(SphinxPostTransform):
    """In a man page, a link to another page of this manual becomes its title in italics.

    The man writer would print it as ``TITLE <>``: there is nowhere to point.
    """

    default_priority = 900
    builders = ("man",)

    def run(self, **kwargs: Any) -> None:
        for node in list(self.document.findall(nodes.reference)):
            uri = node.get("refuri", "")
            if not uri.startswith(("http:", "https:", "mailto:", "ftp:")):
                node.replace_self(nodes.emphasis(text=node.astext()))


# ------------------------------------------------------------------ setup


def always_reread(
    app: Sphinx, env: BuildEnvironment, added: set[str], changed: set[str], removed: set[str]
) -> list[str]:
    """The generated pages depend on files outside docs/: read them every time."""
    return [name for name in DYNAMIC_PAGES if name in env.found_docs]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("nbd-traceability", TraceabilityDirective)
    app.add_directive("nbd-findings", FindingsDirective)
    app.add_directive("nbd-state-diagram", StateDiagramDirective)
    app.add_post_transform(PlainInternalLinks)
    app.connect("builder-inited", check_traces)
    app.connect("env-get-outdated", always_reread)
    app.connect("env-check-consistency", check_options)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
