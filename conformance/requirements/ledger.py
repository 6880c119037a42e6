"""The requirement ledger: one entry per normative sentence of the NBD specification.

The ledger lives in ``conformance/requirements/*.toml``, one file per area
of the spec, as data a reviewer can diff.  Each ``[[requirement]]`` is:

``id``
    a stable name, a slug of the section and a mnemonic
    (``cmd.read.server-must-reply-length``), never positional.
``section``
    the heading path, going on to the named item of a list ("Values /
    Transmission phase / Request types / NBD_CMD_READ"), as
    :mod:`conformance.requirements.extract` builds it.
``source``
    ``proto`` (docs/spec/proto.md) or ``extension`` (a sentence of
    docs/spec/proto-extension-ext-header.md that proto.md does not have).
``sentence``
    the sentence, verbatim (white space may be re-wrapped).
``part``
    when one sentence holds several requirements (mixed levels, two
    triggers), each entry quotes its own verbatim piece of it.
``occurrence``
    2, 3... when the same sentence appears more than once in one section.
``level``
    MUST, MUST NOT, SHOULD, SHOULD NOT, MAY, or ``informative`` (a
    sentence with a key word that states no requirement).
``binds``
    ``server``, ``client`` or ``both``.
``status``
    how the requirement is met, one of :data:`STATUSES`.
``checks``
    the checks (conformance function names) that test it in full.
``partial``
    checks that test part of it (``note`` says which part).
``miscited``
    checks whose ``@spec`` quote is this sentence but which do not test it
    (``note`` says what they test instead): a known list for the lead.
``reason``
    why it is untestable, client-only, a permission, informative, or, for
    ``unchecked``, what a check would have to do.
"""

from __future__ import annotations

import dataclasses
import enum
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path

from .extract import key_words, normalise

__all__ = [
    "LEDGER_DIR",
    "LEVELS",
    "STATUSES",
    "Entry",
    "Status",
    "level_of",
    "load",
]

#: Where the ledger's TOML files are.
LEDGER_DIR = Path(__file__).resolve().parent

#: The levels an entry may have, strongest first.
LEVELS = ("MUST", "MUST NOT", "SHOULD", "SHOULD NOT", "MAY", "informative")

# RFC 2119's synonyms, as the spec's Conventions section lists them.
_SYNONYMS = {
    "REQUIRED": "MUST",
    "SHALL": "MUST",
    "SHALL NOT": "MUST NOT",
    "RECOMMENDED": "SHOULD",
    "NOT RECOMMENDED": "SHOULD NOT",
    "OPTIONAL": "MAY",
}


def level_of(word: str) -> str:
    """The level a key word states: REQUIRED is MUST, OPTIONAL is MAY, and so on."""
    return _SYNONYMS.get(word, word)


class Status(enum.Enum):
    """How an entry is met, from the conformance suite's point of view."""

    #: Checks test the sentence in full.
    CHECKED = "checked"
    #: Checks test part of it (visibility but not durability, one case of several).
    PARTIAL = "partial"
    #: A server could be tested on the wire, but no check does yet: the to-do list.
    UNCHECKED = "unchecked"
    #: Binds the server, but nothing on the wire tells compliance apart (permanent storage).
    UNTESTABLE = "untestable"
    #: Binds only clients: a server-conformance suite does not test it.
    CLIENT_ONLY = "client-only"
    #: A MAY that grants an option rather than naming the only permitted response.
    PERMISSION = "permission"
    #: A key word that states no requirement (the Conventions, an example, a history note).
    INFORMATIVE = "informative"


STATUSES = tuple(s.value for s in Status)

#: Statuses of entries a server-side check could test.
TESTABLE = (Status.CHECKED, Status.PARTIAL, Status.UNCHECKED)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One requirement of the ledger (see the module docstring for the fields)."""

    id: str
    section: str
    sentence: str
    level: str
    binds: str
    status: Status
    file: str
    source: str = "proto"
    part: str | None = None
    occurrence: int = 1
    checks: tuple[str, ...] = ()
    partial: tuple[str, ...] = ()
    miscited: tuple[str, ...] = ()
    reason: str = ""
    note: str = ""

    @property
    def key(self) -> tuple[str, str, str, int]:
        """The sentence this entry classifies: source, heading path, text, occurrence."""
        return (self.source, self.section, normalise(self.sentence), self.occurrence)

    @property
    def text(self) -> str:
        """What the entry requires: its part, or the whole sentence."""
        return self.part if self.part is not None else self.sentence

    @property
    def levels(self) -> set[str]:
        """The levels the key words of the entry's text state."""
        return {level_of(w) for w in key_words(self.text)}

    @property
    def testable(self) -> bool:
        """A requirement on the server a check could test from the wire."""
        return self.status in TESTABLE

    @property
    def cited_by(self) -> tuple[str, ...]:
        """Every check the entry names, whatever it says of them."""
        return self.checks + self.partial + self.miscited


_FIELDS = {f.name for f in dataclasses.fields(Entry)} - {"file"}
_REQUIRED = ("id", "section", "sentence", "level", "binds", "status")


class LedgerError(ValueError):
    """A ledger file that cannot be read as entries."""


def _entry(raw: dict[str, object], file: str) -> Entry:
    unknown = set(raw) - _FIELDS
    missing = [f for f in _REQUIRED if f not in raw]
    where = f"{file}: {raw.get('id', '?')}"
    if unknown or missing:
        raise LedgerError(f"{where}: unknown fields {sorted(unknown)}, missing {missing}")
    values = dict(raw)
    try:
        values["status"] = Status(values["status"])
    except ValueError:
        raise LedgerError(f"{where}: status {raw['status']!r} is not one of {STATUSES}") from None
    for name in ("checks", "partial", "miscited"):
        if name in values:
            value = values[name]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise LedgerError(f"{where}: {name} must be a list of check names")
            values[name] = tuple(value)
    return Entry(file=file, **values)  # type: ignore[arg-type]


def load_file(path: Path) -> list[Entry]:
    """The entries of one ledger file."""
    with path.open("rb") as stream:
        data = tomllib.load(stream)
    raw = data.get("requirement", [])
    if not isinstance(raw, list):
        raise LedgerError(f"{path.name}: [[requirement]] must be an array of tables")
    return [_entry(item, path.name) for item in raw]


def load(directory: Path = LEDGER_DIR) -> list[Entry]:
    """Every entry of the ledger, file by file in name order."""
    return [entry for path in sorted(directory.glob("*.toml")) for entry in load_file(path)]


def by_check(entries: Iterable[Entry]) -> dict[str, list[Entry]]:
    """{check name: the entries that name it}."""
    found: dict[str, list[Entry]] = {}
    for entry in entries:
        for name in entry.cited_by:
            found.setdefault(name, []).append(entry)
    return found


def sentences_of(
    entries: Iterable[Entry],
) -> Iterator[tuple[tuple[str, str, str, int], list[Entry]]]:
    """Each classified sentence with the entries that classify it, in ledger order."""
    grouped: dict[tuple[str, str, str, int], list[Entry]] = {}
    for entry in entries:
        grouped.setdefault(entry.key, []).append(entry)
    yield from grouped.items()


#: The file that lists checks testing no key-word sentence, with the reason.
UNMAPPED = "unmapped.toml"


def load_unmapped(directory: Path = LEDGER_DIR) -> dict[str, str]:
    """{check name: why it tests no sentence of the ledger} from ``unmapped.toml``."""
    path = directory / UNMAPPED
    if not path.exists():
        return {}
    with path.open("rb") as stream:
        data = tomllib.load(stream)
    found: dict[str, str] = {}
    for item in data.get("check", []):
        if set(item) != {"name", "reason"} or not item["reason"]:
            raise LedgerError(f"{UNMAPPED}: each [[check]] has a name and a reason: {item!r}")
        found[item["name"]] = item["reason"]
    return found
