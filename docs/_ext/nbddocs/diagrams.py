"""State diagrams drawn from the transition tables in the code."""

from __future__ import annotations

import importlib
import sys
from typing import Any

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

logger = logging.getLogger(__name__)


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
