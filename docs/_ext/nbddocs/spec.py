"""The headings of the specification, and resolving a check's heading path against them."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from sphinx.util import logging

logger = logging.getLogger(__name__)


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
