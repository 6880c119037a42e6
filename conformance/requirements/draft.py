"""Draft ledger entries for the key-word sentences the ledger does not classify yet.

When a new revision of the spec adds a sentence with a key word, the
ledger's tests fail until someone classifies it.  This tool does the typing:

    python -m conformance.requirements.draft            # print TOML to paste

It guesses an ID, the level, who is bound, a split of a sentence that mixes
levels, and the checks whose quote is the sentence; every guess is a draft
for a person to review (the status is ``unchecked`` or ``client-only`` or
``permission``, with ``reason = "DRAFT: ..."``), never a classification.
"""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Iterable, Sequence

from .checks import Check, suite_checks
from .extract import Classifiable, key_words, normalise, spec_classifiable
from .ledger import level_of, load

__all__ = ["area_slug", "draft_entries", "mnemonic", "split_parts", "toml_entry"]

# Heading-path prefixes and the short slugs IDs start with, most specific first.
_AREAS = (
    ("Protocol phases / Handshake / Oldstyle negotiation", "hs.oldstyle"),
    ("Protocol phases / Handshake / Newstyle negotiation", "hs.newstyle"),
    ("Protocol phases / Handshake / Fixed newstyle negotiation", "hs.fixed"),
    ("Protocol phases / Handshake / Termination of the session", "hs.term"),
    ("Protocol phases / Handshake", "hs"),
    ("Protocol phases / Transmission / Ordering of messages", "tx.order"),
    ("Protocol phases / Transmission / Request message", "tx.request"),
    ("Protocol phases / Transmission / Simple reply message", "tx.simple"),
    ("Protocol phases / Transmission / Structured reply chunk", "tx.structured"),
    ("Protocol phases / Transmission / Extended reply chunk", "tx.extended"),
    ("Protocol phases / Transmission / Terminating", "tx.term"),
    ("Protocol phases / Transmission / Reserved Magic", "tx.magic"),
    ("Protocol phases / Transmission", "tx"),
    ("Protocol phases", "phases"),
    ("TLS support / Server-side requirements / NOTLS", "tls.notls"),
    ("TLS support / Server-side requirements / FORCEDTLS", "tls.forced"),
    ("TLS support / Server-side requirements / SELECTIVETLS", "tls.selective"),
    ("TLS support / Server-side requirements", "tls.server"),
    ("TLS support / Client-side requirements", "tls.client"),
    ("TLS support / Security considerations / TLS versions", "tls.versions"),
    ("TLS support / Security considerations / Protocol downgrade", "tls.downgrade"),
    ("TLS support", "tls"),
    ("Size constraints", "size"),
    ("Metadata querying / The `base:` metadata namespace", "meta.base"),
    ("Metadata querying", "meta"),
    ("Values / Handshake phase / Flag fields / Handshake flags", "hsflag"),
    ("Values / Handshake phase / Flag fields / Client flags", "clientflag"),
    ("Values / Handshake phase / Flag fields / Transmission flags", "txflag"),
    ("Values / Handshake phase / Option types", "opt"),
    ("Values / Handshake phase / Option reply types", "rep"),
    ("Values / Transmission phase / Flag fields / Command flags", "cmdflag"),
    ("Values / Transmission phase / Flag fields / Structured reply flags", "replyflag"),
    ("Values / Transmission phase / Structured reply types", "reply"),
    ("Values / Transmission phase / Request types", "cmd"),
    ("Values / Transmission phase / Error values", "err"),
    ("Experimental extensions", "experimental"),
    ("Compatibility and interoperability", "compat"),
    ("Conventions", "conv"),
)
_PREFIXES = re.compile(
    r"^NBD_(?:OPT_|REP_|CMD_FLAG_|CMD_|REPLY_TYPE_|REPLY_FLAG_|FLAG_C_|FLAG_|STATE_|INFO_)?"
)
_STOP = frozenset(
    re.findall(
        r"[a-z]+",
        "a an the of to and or in on for with by as at be is are it its this that if any all "
        "not no from which when then than such may must should shall their there these those "
        "was has have been will can also only",
    )
)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def area_slug(section: str) -> str:
    """The ID prefix of a heading path: "cmd.read" for "... / Request types / NBD_CMD_READ"."""
    area = next((slug for prefix, slug in _AREAS if section.startswith(prefix)), None)
    if area is None:
        area = _slug(section.split(" / ")[0])
        return area
    prefix = next(p for p, s in _AREAS if s == area)
    rest = section[len(prefix) :].strip(" /")
    if rest and " / " not in rest and "NBD_" in rest:
        names = [_slug(_PREFIXES.sub("", n)) for n in rest.split(" and ")]
        return f"{area}.{'-'.join(names)}"
    return area


def mnemonic(text: str, words: int = 4) -> str:
    """A short slug of what the sentence requires: its subject, level and first content words."""
    found = key_words(text)
    level = _slug(found[0]) if found else "note"
    plain = re.sub(r"`([^`]*)`", r"\1", text)
    before, _, after = plain.partition(found[0].split()[0] if found else "")
    subject = next(
        (w for w in ("server", "client") if w in before.lower().split()[-3:]),
        "",
    )
    content = [w for w in re.findall(r"[a-z0-9_]+", after.lower()) if w not in _STOP]
    if found and found[0].endswith("NOT"):
        content = [w for w in content if w != "not"]
    parts = [subject, level, *content[:words]] if subject else [level, *content[:words]]
    return _slug("-".join(parts))


# Clause boundaries a sentence that mixes levels is cut at, preferred first.
_SEPARATORS = ("; ", ", and ", ", but ", ", while ", " while ", ", or ", " but ", " and ", ", ")


def split_parts(text: str) -> list[str]:
    """TEXT cut at clause boundaries into pieces with one level each, if it mixes levels.

    Each piece is a verbatim substring of TEXT; a sentence that cannot be cut
    cleanly is returned whole, for a person to split.
    """
    plain = re.sub(r"`[^`]*`", lambda m: "x" * len(m.group()), text)
    hits = list(re.finditer(r"\b(MUST NOT|SHOULD NOT|MUST|SHOULD|MAY|REQUIRED|OPTIONAL)\b", plain))
    if '"MUST"' in text or len({level_of(" ".join(h.group(1).split())) for h in hits}) < 2:
        return [text]
    bounds = [(0, 0)]  # (where the previous piece ends, where the next begins)
    for previous, hit in itertools.pairwise(hits):
        window = plain[previous.end() : hit.start()]
        for separator in _SEPARATORS:
            at = window.rfind(separator)
            if at >= 0:
                at += previous.end()
                bounds.append((at, at + len(separator)))
                break
    bounds.append((len(text), len(text)))
    pieces = [
        text[start:end].strip().rstrip(";,").strip()
        for (_, start), (end, _) in itertools.pairwise(bounds)
    ]
    return [p for p in pieces if p] if len(pieces) > 1 else [text]


def _flat(text: str) -> str:
    return normalise(text.replace("`", ""))


def _binds(text: str) -> str:
    plain = re.sub(r"`[^`]*`", "", text).lower()
    first = key_words(text)
    head = plain.split(first[0].lower(), 1)[0] if first else plain
    server, client = "server" in head, "client" in head
    if client and not server:
        return "client"
    if server and not client:
        return "server"
    return "both"


def _citing(checks: Sequence[Check], sentence: str, part: str) -> list[Check]:
    flat_sentence, flat_part = _flat(sentence), _flat(part)
    found = []
    for check in checks:
        if not check.quote:
            continue
        quote = _flat(check.quote)
        if quote in flat_sentence:
            start = flat_sentence.index(quote)
            piece = flat_sentence.index(flat_part) if flat_part in flat_sentence else 0
            if start < piece + len(flat_part) and piece < start + len(quote):
                found.append(check)
        elif flat_sentence in quote:
            found.append(check)
    return found


def toml_string(text: str) -> str:
    """TEXT as a TOML basic string."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def toml_entry(fields: dict[str, object]) -> str:
    """One ``[[requirement]]`` table, fields in the order given."""
    lines = ["[[requirement]]"]
    for name, value in fields.items():
        if isinstance(value, list | tuple):
            if not value:
                continue
            rendered = "[" + ", ".join(toml_string(str(v)) for v in value) + "]"
        elif isinstance(value, int):
            rendered = str(value)
        else:
            rendered = toml_string(str(value))
        lines.append(f"{name} = {rendered}")
    return "\n".join(lines) + "\n"


def draft_entries(
    missing: Iterable[Classifiable], checks: Sequence[Check], taken: set[str]
) -> list[dict[str, object]]:
    """Draft fields for each MISSING sentence; IDs avoid TAKEN (and are added to it)."""
    drafts: list[dict[str, object]] = []
    for item in missing:
        text = normalise(item.sentence.text)
        parts = split_parts(text)
        for part in parts:
            words = key_words(part)
            level = level_of(words[0]) if words else "informative"
            binds = _binds(part)
            base = area_slug(item.sentence.section)
            if item.source == "extension":
                base = "ext." + base
            size, ident = 4, f"{base}.{mnemonic(part)}"
            while ident in taken and size < 12:
                size += 1
                ident = f"{base}.{mnemonic(part, size)}"
            suffix = 2
            while ident in taken:
                ident = f"{base}.{mnemonic(part, size)}-{suffix}"
                suffix += 1
            taken.add(ident)
            citing = _citing(checks, text, part)
            if binds == "client":
                status = "client-only"
            elif level == "MAY":
                status = "permission"
            else:
                status = "checked" if citing else "unchecked"
            fields: dict[str, object] = {
                "id": ident,
                "section": item.sentence.section,
            }
            if item.source != "proto":
                fields["source"] = item.source
            fields["sentence"] = text
            if len(parts) > 1:
                fields["part"] = part
            if item.occurrence > 1:
                fields["occurrence"] = item.occurrence
            fields.update(level=level, binds=binds, status=status)
            fields["checks"] = [c.name for c in citing] if status == "checked" else []
            fields["miscited"] = [c.name for c in citing] if status != "checked" else []
            fields["reason"] = {
                "client-only": "DRAFT: binds only the client",
                "permission": "DRAFT: grants an option; names no only permitted response",
            }.get(status, "DRAFT: review the guesses")
            drafts.append(fields)
    return drafts


def main(argv: Sequence[str] | None = None) -> int:
    """Print draft entries for every key-word sentence the ledger lacks."""
    entries = load()
    known = {e.key for e in entries}
    missing = [c for c in spec_classifiable() if c.key not in known]
    checks, _ = suite_checks()
    for fields in draft_entries(missing, checks, {e.id for e in entries}):
        print(toml_entry(fields))
    print(f"# {len(missing)} sentences to classify", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
