"""Split the Markdown specification into heading paths and sentences.

The requirement ledger (``conformance/requirements/*.toml``) must hold every
sentence of ``docs/spec/proto.md`` (and of the EXTENDED_HEADERS extension)
that carries an RFC 2119 key word, exactly once.  This module finds those
sentences, so that a test can compare them with the ledger and a new
specification revision with a new MUST fails until someone classifies it.

The spec's "Conventions" section names the key words it uses: "MUST",
"MUST NOT", "REQUIRED", "SHALL", "SHALL NOT", "SHOULD", "SHOULD NOT",
"RECOMMENDED", "MAY" and "OPTIONAL" (RFC 2119); lower-case words carry their
natural meaning, so only upper-case words count here.

The Markdown of proto.md is simple: ``#`` headings, paragraphs, ``*``/``-``
list items (nested by indentation), message layouts of ``S:``/``C:`` lines
and code spans.  Sentences keep their Markdown text verbatim, with line
breaks and runs of spaces collapsed to one space and list markers removed.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "EXTENSION",
    "KEY_WORDS",
    "PROTO",
    "Classifiable",
    "Sentence",
    "blocks",
    "classifiable",
    "key_words",
    "normalise",
    "normative",
    "sentences",
    "spec_classifiable",
    "split_sentences",
]

#: The key words of the spec's Conventions section, longest first so that
#: "MUST NOT" is found as itself, not as "MUST".
KEY_WORDS = (
    "MUST NOT",
    "SHALL NOT",
    "SHOULD NOT",
    "NOT RECOMMENDED",
    "MUST",
    "SHALL",
    "SHOULD",
    "REQUIRED",
    "RECOMMENDED",
    "MAY",
    "OPTIONAL",
)

_KEY_WORD = re.compile(r"\b(" + "|".join(w.replace(" ", r"\s+") for w in KEY_WORDS) + r")\b")
_CODE_SPAN = re.compile(r"`[^`]*`")
_MENTION = re.compile(r"([\"'])[A-Z ]+\1")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LIST_ITEM = re.compile(r"^\s*(?:[*+-]|\d+[.)])\s+")
_MESSAGE_LINE = re.compile(r"^\s*[SC]:\s")
# A top-level list item that defines a named value ("* `NBD_CMD_READ` (0)",
# "- bit 1, `NBD_FLAG_READ_ONLY`: ...") starts an item the heading path goes
# on to, as the suite's citations do ("... / Request types / NBD_CMD_READ").
_NAMED_ITEM = re.compile(r"^[*-]\s+(?:bit \d+, )?`([^`]+)`(?: \([^)]*\))?(?: and `([^`]+)`)?")
# Words whose trailing full stop does not end a sentence.
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.", "resp.")
# A sentence ends at ., ! or ? (possibly followed by a closing bracket or
# quote) before white space and a capital, a code span, a bracket or a quote.
_BOUNDARY = re.compile(r"(?<=[.!?])([)\"'*_]*)\s+(?=[A-Z`(\"'*_\[])")


def normalise(text: str) -> str:
    """TEXT with every run of white space made one space: how sentences are compared."""
    return " ".join(text.split())


def key_words(text: str, *, mentions: bool = False) -> list[str]:
    """The RFC 2119 key words in TEXT, in order, outside code spans ("MUST NOT" is one).

    A key word in quotes ('MUST', "SHOULD") is mentioned, not used: it
    counts only with MENTIONS, which is how sentences are found (the
    Conventions sentence that defines the words is still classified).
    """
    text = _CODE_SPAN.sub("", text)
    if not mentions:
        text = _MENTION.sub("", text)
    return [" ".join(m.group(1).split()) for m in _KEY_WORD.finditer(text)]


@dataclasses.dataclass(frozen=True)
class Sentence:
    """One sentence of the spec under its heading path ("A / B / C", below the title)."""

    section: str
    text: str
    line: int

    @property
    def key_words(self) -> list[str]:
        return key_words(self.text, mentions=True)

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the sentence: its heading path and its normalised text."""
        return (self.section, normalise(self.text))


def blocks(markdown: str) -> Iterator[tuple[str, int, str]]:
    """(heading path, first line number, text) of every paragraph, list item and message line.

    A block ends at a blank line, a heading, the start of a list item or an
    ``S:``/``C:`` message line; its lines are joined with single spaces.
    Below a top-level list item that names a value (`NBD_CMD_READ`), the
    heading path goes on to that name until the next such item, the next
    heading or the next unindented paragraph.
    """
    stack: list[str] = []
    item = ""
    current: list[str] = []
    start = 0

    def section() -> str:
        return " / ".join([*stack, item] if item else stack)

    def flush() -> Iterator[tuple[str, int, str]]:
        if current:
            yield section(), start, normalise(" ".join(current))
            current.clear()

    for number, line in enumerate(markdown.splitlines(), start=1):
        heading = _HEADING.match(line)
        if heading:
            yield from flush()
            level = len(heading.group(1))
            if level == 1:
                stack = []
            else:
                del stack[level - 2 :]
                stack.extend([""] * (level - 2 - len(stack)))
                stack.append(heading.group(2))
            item = ""
            continue
        if not line.strip():
            yield from flush()
            continue
        marker = _LIST_ITEM.match(line)
        if marker or _MESSAGE_LINE.match(line):
            yield from flush()
        if not current and not line[0].isspace():
            named = _NAMED_ITEM.match(line)
            if named:
                item = " and ".join(n for n in named.groups() if n)
            elif not marker:
                item = ""
        if marker:
            line = line[marker.end() :]
        if not current:
            start = number
        current.append(line.strip())
    yield from flush()


def split_sentences(text: str) -> list[str]:
    """TEXT (one block, normalised) cut into sentences.

    A full stop after an abbreviation ("e.g.") or inside a code span does
    not end a sentence.
    """
    spans = [(m.start(), m.end()) for m in _CODE_SPAN.finditer(text)]
    cuts = [0]
    for match in _BOUNDARY.finditer(text):
        end = match.start() + len(match.group(1))
        if any(a < end <= b for a, b in spans):
            continue
        before = text[:end].rstrip(")\"'*_")
        if before.lower().endswith(_ABBREVIATIONS):
            continue
        cuts.append(end)
    cuts.append(len(text))
    parts = (text[a:b].strip() for a, b in itertools.pairwise(cuts))
    return [p for p in parts if p]


def sentences(markdown: str) -> list[Sentence]:
    """Every sentence of MARKDOWN with its heading path and line, in document order."""
    found: list[Sentence] = []
    for section, line, text in blocks(markdown):
        found.extend(Sentence(section, part, line) for part in split_sentences(text))
    return found


def normative(markdown: str) -> list[Sentence]:
    """The sentences of MARKDOWN that carry at least one key word."""
    return [s for s in sentences(markdown) if s.key_words]


#: The pinned specification and its EXTENDED_HEADERS branch (docs/spec/README.md).
SPEC_DIR = Path(__file__).resolve().parents[2] / "docs" / "spec"
PROTO = SPEC_DIR / "proto.md"
EXTENSION = SPEC_DIR / "proto-extension-ext-header.md"


@dataclasses.dataclass(frozen=True)
class Classifiable:
    """A key-word sentence the ledger must classify, and which document it is from."""

    source: str
    sentence: Sentence
    occurrence: int

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.source, self.sentence.section, normalise(self.sentence.text), self.occurrence)


def _numbered(source: str, found: list[Sentence]) -> list[Classifiable]:
    seen: dict[tuple[str, str], int] = {}
    result = []
    for sentence in found:
        seen[sentence.key] = seen.get(sentence.key, 0) + 1
        result.append(Classifiable(source, sentence, seen[sentence.key]))
    return result


def classifiable(proto: str, extension: str | None = None) -> list[Classifiable]:
    """Every key-word sentence of PROTO, then those of EXTENSION that PROTO does not have.

    The extension's document is a whole copy of proto.md as amended; only
    its own sentences (compared by normalised text, wherever they are) need
    entries of their own.
    """
    result = _numbered("proto", normative(proto))
    if extension is not None:
        known = {normalise(s.text) for s in sentences(proto)}
        own = [s for s in normative(extension) if normalise(s.text) not in known]
        result += _numbered("extension", own)
    return result


def spec_classifiable() -> list[Classifiable]:
    """:func:`classifiable` of the repository's pinned documents."""
    extension = EXTENSION.read_text() if EXTENSION.exists() else None
    return classifiable(PROTO.read_text(), extension)
