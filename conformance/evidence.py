"""What went over the wire during one check: the evidence that comes with its verdict.

A failure is only useful if it shows what the server was sent and what it
answered.  While a check runs, every connection it opens writes here: the
raw-wire client each frame it sends or decodes (direction, message type,
named fields and the header's bytes in hex), a libnbd handle each call it
makes with its arguments and its result or error.  When the check fails or
warns, the plugin attaches the transcript to the report (JSON, JUnit, the
matrix).

The transcript is bounded: payloads are summarised, lines shortened, and only
the last :data:`MAX_LINES` lines kept (with a count of those dropped), so that
the report of a badly broken server stays small.  A check runs in one thread
of one process at a time (xdist workers are processes), so one module-level
transcript is enough; its deque tolerates the threads some checks start.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

#: Lines kept per check: the end of the exchange is where a failure shows.
MAX_LINES = 80
#: Characters kept per line.
MAX_LINE = 240
#: Bytes of a payload shown in hex.
HEX_BYTES = 16


class Transcript:
    """The bounded exchange of one check, line by line, each naming its connection."""

    def __init__(self, limit: int = MAX_LINES) -> None:
        self.lines: deque[str] = deque(maxlen=limit)
        self.total = 0
        self._numbers = itertools.count(1)

    def connection(self, kind: str) -> str:
        """A name for a new connection of this check: 'wire#1', 'nbd#2'..."""
        return f"{kind}#{next(self._numbers)}"

    def add(self, who: str, line: str) -> None:
        self.total += 1
        if len(line) > MAX_LINE:
            line = line[: MAX_LINE - 3] + "..."
        self.lines.append(f"{who} {line}")

    def text(self) -> str:
        dropped = self.total - len(self.lines)
        head = [f"... {dropped} earlier lines not kept"] if dropped > 0 else []
        return "\n".join([*head, *self.lines])


_current: Transcript | None = None


def begin() -> Transcript:
    """Start the transcript of a new check."""
    global _current
    _current = Transcript()
    return _current


def end() -> Transcript | None:
    """Stop recording; the transcript of the check that ran."""
    global _current
    done, _current = _current, None
    return done


def current() -> Transcript | None:
    """The transcript of the running check, if any."""
    return _current


def connection(kind: str) -> str:
    """The name a new connection of KIND records under."""
    return _current.connection(kind) if _current is not None else kind


def record(who: str, line: str) -> None:
    """Add a line to the running check's transcript (nothing outside a check)."""
    if _current is not None:
        _current.add(who, line)


def summarise(value: Any) -> str:
    """An argument or result as a short, bounded text: payloads by size and first bytes."""
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value[:HEX_BYTES])
        more = "..." if len(value) > HEX_BYTES else ""
        return f"<{len(value)} bytes {data.hex()}{more}>"
    if callable(value):
        return "<callback>"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
