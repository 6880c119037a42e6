"""Local Sphinx extension: keeps the documentation honest about the code.

At build time it

* checks that every option of the reference server's argparse parser, and
  every option the conformance plugin adds to pytest, is documented with an
  ``.. option::`` directive on its manual page, and that no documented option
  has disappeared from the code;
* runs ``docs/traces/capture.py --check``: the protocol tour's captured
  exchanges must match what the reference server does now;
* generates the traceability page (``.. nbd-traceability::``) from the
  headings of ``docs/spec/proto.md`` and the ``@spec(...)`` tags of the
  conformance checks, found by static analysis (the suite is never imported);
* renders the findings page (``.. nbd-findings::``) from ``reports/*.json``.

Every problem is a Sphinx warning, so ``sphinx-build -W`` (``tox -e docs``)
fails on it.
"""

from __future__ import annotations

import ast
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    file: str
    line: int
    section: str
    level: str
    quote: str | None


def _string(node: ast.expr | None, names: dict[str, ast.expr], depth: int = 0) -> str | None:
    """The value of a string expression made of literals, module constants and ``+``."""
    if node is None or depth > 20:
        return None
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else None
    if isinstance(node, ast.Name) and node.id in names:
        return _string(names[node.id], names, depth + 1)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string(node.left, names, depth + 1), _string(node.right, names, depth + 1)
        return left + right if left is not None and right is not None else None
    return None


def _level(node: ast.expr | None) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Constant):
        return str(node.value)
    return "MUST"


def _module_constants(tree: ast.Module) -> dict[str, ast.expr]:
    names: dict[str, ast.expr] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target = statement.targets[0]
            if isinstance(target, ast.Name):
                names[target.id] = statement.value
        elif (
            isinstance(statement, ast.AnnAssign)
            and statement.value is not None
            and isinstance(statement.target, ast.Name)
        ):
            names[statement.target.id] = statement.value
    return names


def _spec_call(decorator: ast.expr) -> ast.Call | None:
    if not isinstance(decorator, ast.Call):
        return None
    func = decorator.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    return decorator if name == "spec" else None


def suite_checks(directory: Path) -> tuple[list[Check], list[str]]:
    """Every ``@spec(...)``-tagged check in DIRECTORY/test_*.py, by static analysis."""
    checks: list[Check] = []
    problems: list[str] = []
    for path in sorted(directory.glob("test_*.py")):
        relative = path.relative_to(REPO).as_posix()
        try:
            tree = ast.parse(path.read_text(), relative)
        except SyntaxError as exc:
            problems.append(f"{relative}: cannot parse: {exc}")
            continue
        names = _module_constants(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for decorator in node.decorator_list:
                call = _spec_call(decorator)
                if call is None:
                    continue
                args: dict[str, ast.expr | None] = dict(
                    zip(("section", "level", "quote"), call.args, strict=False)
                )
                args.update({k.arg: k.value for k in call.keywords if k.arg})
                section = _string(args.get("section"), names)
                if section is None:
                    problems.append(
                        f"{relative}:{node.lineno}: {node.name}: cannot read the section of its "
                        "@spec statically (use a string literal or a module-level constant)"
                    )
                    continue
                checks.append(
                    Check(
                        name=node.name,
                        file=relative,
                        line=node.lineno,
                        section=section,
                        level=_level(args.get("level")),
                        quote=_string(args.get("quote"), names) or None,
                    )
                )
    return checks, problems


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


def _check_list(checks: list[tuple[Check, str]]) -> nodes.Node:
    if not checks:
        return _para(nodes.emphasis(text="not covered yet"))
    items = nodes.bullet_list()
    for check, item in checks:
        para = _para(
            nodes.literal(text=check.name),
            f" ({check.level}; {check.file}:{check.line}"
            + (f"; about {item}" if item else "")
            + ")",
        )
        items += nodes.list_item("", para)
    return items


class TraceabilityDirective(SphinxDirective):
    """Every heading of proto.md, the checks that enforce it, and the gaps."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        self.env.note_dependency(str(SPEC))
        if not SPEC.exists():
            logger.warning(
                "the specification is missing: expected %s (the repository's "
                "docs/spec/proto.md); the traceability page cannot be generated",
                SPEC,
                location=self.get_location(),
            )
            return [_para(nodes.strong(text=f"The specification ({SPEC}) was not found."))]
        headings = spec_headings(SPEC)
        extension = spec_headings(EXT_SPEC) if EXT_SPEC.exists() else []
        checks, problems = suite_checks(REPO / "conformance")
        for problem in problems:
            logger.warning(problem, location=self.get_location())
        by_heading: dict[Heading, list[tuple[Check, str]]] = {h: [] for h in headings}
        by_extension: dict[Heading, list[tuple[Check, str]]] = {}
        for check in checks:
            heading, item = resolve(check.section, headings)
            if heading is not None:
                by_heading[heading].append((check, item))
                continue
            ext_heading, ext_item = resolve(check.section, extension)
            if ext_heading is not None and ext_heading not in headings:
                by_extension.setdefault(ext_heading, []).append((check, ext_item))
                continue
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
        covered = [h for h in headings if by_heading[h]]
        result: list[nodes.Node] = [
            _para(
                f"{len(checks)} checks in {len({c.file for c in checks})} files cite "
                f"{len(covered)} of the {len(headings)} headings of proto.md; "
                f"{len(headings) - len(covered)} headings have no check yet. Levels: "
                + ", ".join(
                    f"{sum(c.level == level for c in checks)} {level}"
                    for level in ("MUST", "SHOULD", "MAY")
                )
                + "."
            )
        ]
        rows = [
            [
                _para(nodes.literal(text=h.title)),
                _check_list(sorted(by_heading[h], key=lambda ci: ci[0].name)),
            ]
            for h in headings
        ]
        section = nodes.rubric(text="Every heading of proto.md")
        result += [section, _table(["Heading (proto.md)", "Checks"], rows, [35, 65])]
        if by_extension:
            result.append(nodes.rubric(text="The EXTENDED_HEADERS extension"))
            result.append(
                _table(
                    ["Heading (proto-extension-ext-header.md)", "Checks"],
                    (
                        [_para(nodes.literal(text=h.title)), _check_list(v)]
                        for h, v in by_extension.items()
                    ),
                    [35, 65],
                )
            )
        result.append(nodes.rubric(text="Headings no check covers yet"))
        gaps = nodes.bullet_list()
        for heading in headings:
            if not by_heading[heading]:
                below = sum(
                    len(v)
                    for h, v in by_heading.items()
                    if h.path[: len(heading.path)] == heading.path and h != heading
                )
                note = f" (line {heading.line}" + (
                    f"; its subsections have {below} checks)" if below else ")"
                )
                gaps += nodes.list_item("", _para(nodes.literal(text=heading.title), note))
        result.append(gaps if len(gaps) else _para("None: every heading has a check."))
        return result


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
    app.add_post_transform(PlainInternalLinks)
    app.connect("builder-inited", check_traces)
    app.connect("env-get-outdated", always_reread)
    app.connect("env-check-consistency", check_options)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
