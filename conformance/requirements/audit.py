"""What keeps the ledger honest: its sentences against the spec, its check names against the suite.

Each function returns a list of problems, one sentence each, empty when
all is well; ``tests/test_requirements_ledger.py`` asserts they are empty,
and ``python -m conformance.requirements.audit`` prints them with the list
of checks that cite a sentence they do not test (the ``miscited`` lists).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence

from .checks import Check, suite_checks
from .extract import Classifiable, normalise, spec_classifiable
from .ledger import LEVELS, Entry, Status, load, load_unmapped, sentences_of

__all__ = [
    "check_problems",
    "entry_problems",
    "quote_targets",
    "sentence_problems",
]

ID_PATTERN = re.compile(r"^[a-z0-9]+(?:[.-][a-z0-9]+)*$")
BINDS = ("server", "client", "both")
# A check's level names the strength it enforces; MUST NOT is tested as a MUST.
_CHECK_LEVEL = {
    "MUST": "MUST",
    "MUST NOT": "MUST",
    "SHOULD": "SHOULD",
    "SHOULD NOT": "SHOULD",
    "MAY": "MAY",
}
# Statuses that need a reason: why the entry needs or has no check.
_NEEDS_REASON = (Status.UNTESTABLE, Status.CLIENT_ONLY, Status.PERMISSION, Status.INFORMATIVE)


def sentence_problems(entries: Sequence[Entry], spec: Sequence[Classifiable]) -> list[str]:
    """Every key-word sentence of the spec is classified exactly once, and nothing else is.

    A sentence split into several entries (mixed levels, two triggers) is
    classified once when every entry quotes a different part of it.
    """
    problems = []
    wanted = {c.key: c for c in spec}
    grouped = dict(sentences_of(entries))
    for key, item in wanted.items():
        if key not in grouped:
            problems.append(
                f"not in the ledger ({item.source}, line {item.sentence.line}, "
                f"{item.sentence.section!r}): {item.sentence.text!r} "
                "(python -m conformance.requirements.draft prints a draft entry)"
            )
    for key, group in grouped.items():
        ids = ", ".join(e.id for e in group)
        if key not in wanted:
            problems.append(f"{ids}: no such key-word sentence in the spec's {key[1]!r}")
        if len(group) > 1:
            parts = [e.part for e in group]
            if None in parts or len(set(parts)) != len(parts):
                problems.append(
                    f"{ids}: one sentence classified {len(group)} times; "
                    "each entry of a split sentence needs its own 'part'"
                )
    return problems


def entry_problems(entries: Sequence[Entry]) -> list[str]:
    """Each entry is well-formed: unique ID, known level and binds, a level its words state."""
    problems = []
    seen: set[str] = set()
    for entry in entries:
        where = f"{entry.file}: {entry.id}"
        if entry.id in seen:
            problems.append(f"{where}: the ID is used twice")
        seen.add(entry.id)
        if not ID_PATTERN.match(entry.id):
            problems.append(f"{where}: an ID is lower-case words joined by '.' and '-'")
        if entry.level not in LEVELS:
            problems.append(f"{where}: level {entry.level!r} is not one of {LEVELS}")
        if entry.binds not in BINDS:
            problems.append(f"{where}: binds {entry.binds!r} is not one of {BINDS}")
        if entry.source not in ("proto", "extension"):
            problems.append(f"{where}: source {entry.source!r} is neither proto nor extension")
        if entry.part is not None and normalise(entry.part) not in normalise(entry.sentence):
            problems.append(f"{where}: its part is not a verbatim piece of its sentence")
        problems += _level_problems(entry, where)
        problems += _status_problems(entry, where)
    return problems


def _level_problems(entry: Entry, where: str) -> list[str]:
    if entry.level == "informative":
        return [] if entry.status is Status.INFORMATIVE else [f"{where}: informative, not so"]
    if entry.status is Status.INFORMATIVE:
        return [f"{where}: status informative needs level informative"]
    if entry.level not in entry.levels:
        return [f"{where}: level {entry.level} but its text says {sorted(entry.levels)}"]
    if entry.part is None and entry.levels != {entry.level}:
        return [
            f"{where}: the sentence mixes levels {sorted(entry.levels)}: "
            "split it into entries with a 'part' each"
        ]
    return []


def _status_problems(entry: Entry, where: str) -> list[str]:
    status = entry.status
    problems = []
    if status is Status.CHECKED and not entry.checks:
        problems.append(f"{where}: status checked names no check in 'checks'")
    if status is Status.PARTIAL and (entry.checks or not entry.partial or not entry.note):
        problems.append(f"{where}: status partial wants 'partial' checks, a 'note', no 'checks'")
    if status not in (Status.CHECKED, Status.PARTIAL) and (entry.checks or entry.partial):
        problems.append(f"{where}: status {status.value} but it names checks that test it")
    if status in _NEEDS_REASON and not entry.reason:
        problems.append(f"{where}: status {status.value} needs a 'reason'")
    if entry.miscited and not entry.note:
        problems.append(f"{where}: miscited checks need a 'note' saying what they test")
    if status is Status.CLIENT_ONLY and entry.binds != "client":
        problems.append(f"{where}: client-only, but binds {entry.binds}")
    if entry.binds == "client" and entry.testable:
        problems.append(f"{where}: binds only the client, yet status {status.value}")
    if status is Status.PERMISSION and entry.level != "MAY":
        problems.append(f"{where}: a permission is a MAY, not {entry.level}")
    if "DRAFT" in entry.reason:
        problems.append(f"{where}: still a draft ({entry.reason})")
    return problems


def _flat(text: str) -> str:
    return normalise(text.replace("`", ""))


def quote_targets(check: Check, entries: Sequence[Entry]) -> list[Entry]:
    """The entries whose text a check's quote is (or overlaps, or spans)."""
    if not check.quote:
        return []
    quote = _flat(check.quote)
    found = []
    for entry in entries:
        sentence = _flat(entry.sentence)
        if sentence in quote:
            found.append(entry)
        elif quote in sentence:
            start, part = sentence.index(quote), _flat(entry.text)
            at = sentence.find(part)
            if at < 0 or (start < at + len(part) and at < start + len(quote)):
                found.append(entry)
    return found


def check_problems(
    entries: Sequence[Entry], checks: Sequence[Check], unmapped: dict[str, str]
) -> list[str]:
    """The ledger and the suite agree on which check tests what.

    * every check the ledger names exists;
    * every check is named by an entry, or listed in ``unmapped.toml`` with
      a reason: a check whose quote is a sentence with no key word, or which
      has no quote and tests no key-word sentence (it may still be named by
      the entries it does test);
    * a check with a quote is named by an entry of each sentence its quote
      is, whose part the quote overlaps (under checks, partial or miscited:
      a quote of a sentence it does not test is recorded, not hidden);
    * a check that tests an entry (checks, partial) has the entry's level.
    """
    problems = []
    by_name = {c.name: c for c in checks}
    named: dict[str, list[Entry]] = {}
    for entry in entries:
        for name in entry.cited_by:
            named.setdefault(name, []).append(entry)
            if name not in by_name:
                problems.append(f"{entry.id}: names {name}, which is no check of the suite")
    for name in sorted(set(unmapped) - set(by_name)):
        problems.append(f"unmapped.toml: {name} is no check of the suite")
    for check in checks:
        where = f"{check.file}:{check.line}: {check.name}"
        listed = check.name in unmapped
        if check.name not in named and not listed:
            problems.append(f"{where}: no ledger entry names it (nor unmapped.toml)")
        targets = quote_targets(check, entries)
        if check.quote and not targets and not listed:
            problems.append(
                f"{where}: its quote is no key-word sentence of the ledger "
                f"(list it in unmapped.toml with why): {check.quote!r}"
            )
        if listed and targets:
            problems.append(
                f"{where}: in unmapped.toml, yet its quote is {targets[0].id}: take it out"
            )
        if listed and not check.quote and check.name in named:
            problems.append(
                f"{where}: in unmapped.toml, yet named by {named[check.name][0].id}: take it out"
            )
        hit: dict[str, list[Entry]] = {}
        for entry in targets:
            hit.setdefault(normalise(entry.sentence), []).append(entry)
        for group in hit.values():
            if not any(check.name in entry.cited_by for entry in group):
                problems.append(
                    f"{where}: quotes {', '.join(e.id for e in group)} but no entry of that "
                    "sentence names it (add it to checks, partial or miscited)"
                )
        for entry in named.get(check.name, []):
            tests_it = check.name in entry.checks or check.name in entry.partial
            if tests_it and _CHECK_LEVEL.get(entry.level) != check.level:
                problems.append(
                    f"{where}: tagged {check.level}, but tests {entry.id} ({entry.level}); "
                    "fix the tag or list it under miscited"
                )
    return problems


def all_problems(
    entries: Sequence[Entry] | None = None, checks: Iterable[Check] | None = None
) -> list[str]:
    """Every problem of the repository's ledger against its spec and suite."""
    entries = load() if entries is None else entries
    found, unreadable = suite_checks() if checks is None else (list(checks), [])
    return (
        unreadable
        + sentence_problems(entries, spec_classifiable())
        + entry_problems(entries)
        + check_problems(entries, found, load_unmapped())
    )


def main() -> int:
    """Print the ledger's problems and the checks that cite what they do not test."""
    entries = load()
    problems = all_problems(entries)
    for problem in problems:
        print("PROBLEM:", problem)
    for entry in entries:
        for name in entry.miscited:
            print(f"MISCITED: {name} quotes {entry.id} ({entry.level}): {entry.note}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
