"""Spec tagging and the shared verifiers of the conformance suite.

Every check is tagged with the heading path of the section of
``proto.md`` it enforces (the document has no section numbers), the level
of the requirement (MUST, SHOULD, MAY) and, where one sentence carries the
requirement, a verbatim quote of it.  The verifiers fail with messages of
the form "WHAT: expected X, actual Y" (h2spec's style) so that a verdict can
be read without the code.
"""

from __future__ import annotations

import enum
import errno as _errno
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeVar

import pytest

from conformance.verdict import Unsupported
from conformance.wire.constants import STRING_MAX

__all__ = [
    "MAY",
    "MUST",
    "SHOULD",
    "Level",
    "SpecViolation",
    "errno_name",
    "expect",
    "expect_data",
    "expect_equal",
    "expect_nbd_error",
    "expect_zero",
    "spec",
    "unsupported",
]

#: The name of the pytest marker `spec` applies.
MARKER = "nbd_spec"


class Level(enum.Enum):
    """The strength of a requirement, as the spec's conventions define it."""

    MUST = "MUST"
    SHOULD = "SHOULD"
    MAY = "MAY"

    def __str__(self) -> str:
        return self.value


MUST = Level.MUST
SHOULD = Level.SHOULD
MAY = Level.MAY

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def spec(section: str, level: Level = Level.MUST, quote: str | None = None) -> Callable[[F], F]:
    """Tag a check with the spec section (heading path) and level it enforces.

    >>> @spec("Values / Transmission phase / Error values", SHOULD)
    ... def test_something(server): ...
    """
    if not isinstance(level, Level):
        raise TypeError(f"level must be a Level, not {level!r}")
    if not section or section.startswith("/") or section.endswith("/"):
        raise ValueError(f"section must be a heading path like 'A / B', not {section!r}")

    def decorate(func: F) -> F:
        marked: F = pytest.mark.nbd_spec(section=section, level=level, quote=quote)(func)
        return marked

    return decorate


class SpecViolation(AssertionError):
    """A server behaviour contrary to the spec, with expected and actual values."""

    def __init__(
        self,
        what: str,
        expected: object = None,
        actual: object = None,
        *,
        detail: str | None = None,
    ) -> None:
        self.what = what
        self.expected = expected
        self.actual = actual
        if detail is None:
            detail = f"expected {_short(expected)}, actual {_short(actual)}"
        super().__init__(f"{what}: {detail}")


def _short(value: object, limit: int = 200) -> str:
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 20] + f"... ({len(text)} chars)"
    return text


def unsupported(reason: str) -> NoReturn:
    """End the check with verdict UNSUPPORTED: the server does not offer the feature."""
    raise Unsupported(reason)


def expect(condition: object, what: str, expected: object = True, actual: object = None) -> None:
    """Fail with WHAT unless CONDITION holds."""
    if not condition:
        raise SpecViolation(what, expected, condition if actual is None else actual)


def expect_equal(actual: object, expected: object, what: str) -> None:
    """Fail with "WHAT: expected X, actual Y" unless ACTUAL == EXPECTED."""
    if actual != expected:
        raise SpecViolation(what, expected, actual)


def _first_difference(actual: bytes, expected: bytes) -> int:
    n = min(len(actual), len(expected))
    # Compare in blocks first so that megabytes are compared at C speed.
    step = 4096
    for start in range(0, n, step):
        if actual[start : start + step] != expected[start : start + step]:
            for i in range(start, min(start + step, n)):
                if actual[i] != expected[i]:
                    return i
    return n


def expect_data(
    actual: bytes | bytearray | memoryview, expected: bytes | bytearray, what: str
) -> None:
    """Fail unless ACTUAL equals EXPECTED byte for byte; report the first difference."""
    actual = bytes(actual)
    expected = bytes(expected)
    if actual == expected:
        return
    if len(actual) != len(expected):
        raise SpecViolation(what, detail=f"expected {len(expected)} bytes, actual {len(actual)}")
    at = _first_difference(actual, expected)
    raise SpecViolation(
        what,
        detail=(
            f"first difference at byte {at} of {len(expected)}: expected "
            f"{expected[at : at + 16].hex()}, actual {actual[at : at + 16].hex()}"
        ),
    )


def expect_zero(actual: bytes | bytearray, what: str) -> None:
    """Fail unless every byte of ACTUAL is zero."""
    expect_data(actual, bytes(len(actual)), what)


def expect_string(data: bytes, what: str, *, limit: int = STRING_MAX) -> None:
    """Fail unless DATA is a string as "Conventions" defines it: UTF-8, no NUL, within LIMIT."""
    expect(b"\0" not in data, what, "no NUL character", data[:80])
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecViolation(what, "valid UTF-8", f"{exc}: {data[:80]!r}") from None
    expect(len(data) <= limit, f"length of {what}", f"<= {limit} bytes", len(data))


def errno_name(value: int | None) -> str:
    """'EPERM (1)' for 1: how errors appear in verdicts."""
    if value is None:
        return "no errno"
    return f"{_errno.errorcode.get(value, '?')} ({value})"


def expect_nbd_error(
    call: Callable[[], object], errno_expected: int | Iterable[int], what: str
) -> BaseException:
    """Run CALL (a libnbd request) and check that the server rejected it with that errno.

    libnbd maps the NBD error values onto the host's errno (NBD_EPERM ->
    EPERM, ..., NBD_ENOTSUP -> ENOTSUP) and raises ``nbd.Error`` with
    ``.errnum`` set (``.errno`` is its name).  ERRNO_EXPECTED is one errno
    or several acceptable ones.  Returns the error for further inspection.
    """
    import nbd  # Debian's python3-libnbd; imported late so raw-wire checks do not need it

    allowed = {errno_expected} if isinstance(errno_expected, int) else set(errno_expected)
    names = " or ".join(errno_name(e) for e in sorted(allowed))
    try:
        result = call()
    except nbd.Error as err:
        if err.errnum not in allowed:
            raise SpecViolation(
                what,
                detail=(
                    f"expected error {names}, actual error {errno_name(err.errnum)}: {err.string}"
                ),
            ) from err
        error: BaseException = err
        return error
    raise SpecViolation(what, detail=f"expected error {names}, actual success ({_short(result)})")


def expect_success(call: Callable[[], T], what: str) -> T:
    """Run CALL (a libnbd request) and return its result; a server error is a violation.

    For checks whose requirement is that a request succeeds: the error reply
    becomes a :class:`SpecViolation` (graded at the check's level, so a
    SHOULD warns) instead of an ``nbd.Error`` that reads as a broken check.
    """
    import nbd  # imported late, as in expect_nbd_error

    try:
        return call()
    except nbd.Error as err:
        raise SpecViolation(
            what, detail=f"expected success, actual error {errno_name(err.errnum)}: {err.string}"
        ) from err
