"""How much of the specification the suite checks: figures for the plugin and the docs.

Only requirements on the server that a check could test from the wire
count (statuses checked, partial, unchecked); the rest (client-only,
untestable, permissions, informative sentences) are counted apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from .ledger import LEVELS, Entry, Status, load

__all__ = ["Coverage", "coverage", "coverage_lines"]


@dataclasses.dataclass
class Coverage:
    """Testable server-side entries of one level: checked in full, in part, not at all."""

    level: str
    checked: int = 0
    partial: int = 0
    unchecked: int = 0

    @property
    def total(self) -> int:
        return self.checked + self.partial + self.unchecked


def coverage(entries: Iterable[Entry]) -> list[Coverage]:
    """Per level (MUST, MUST NOT, ...), how many testable entries are checked."""
    rows = {level: Coverage(level) for level in LEVELS if level != "informative"}
    for entry in entries:
        row = rows.get(entry.level)
        if row is None or not entry.testable:
            continue
        if entry.status is Status.CHECKED:
            row.checked += 1
        elif entry.status is Status.PARTIAL:
            row.partial += 1
        else:
            row.unchecked += 1
    return [row for row in rows.values() if row.total]


def coverage_lines(entries: Iterable[Entry] | None = None) -> list[str]:
    """The figures as lines of text (for ``--help`` and the end-of-run table)."""
    entries = list(load() if entries is None else entries)
    rows = coverage(entries)
    lines = ["Spec coverage (testable server requirements: checked in full / in part / not yet):"]
    for row in rows:
        lines.append(
            f"  {row.level:<10} {row.checked:>4} / {row.partial:>3} / {row.unchecked:>3}"
            f"  of {row.total}"
        )
    others: dict[str, int] = {}
    for entry in entries:
        if not entry.testable:
            others[entry.status.value] = others.get(entry.status.value, 0) + 1
    lines.append(
        "  not testable by a server check: "
        + ", ".join(f"{n} {status}" for status, n in sorted(others.items()))
    )
    return lines


if __name__ == "__main__":
    print("\n".join(coverage_lines()))
