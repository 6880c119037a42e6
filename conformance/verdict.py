"""The verdicts a check can get, and the two ways a check ends without judging.

A verdict is decided once per phase report, on the process that ran the
check (:func:`decide`), and travels with the report (under xdist, to the
controller) as plain values; the terminal status, the section table and the
reports all read that one value.  Nothing parses skip reasons.

Two exception types end a check without a verdict on the server's behaviour:
:class:`Unsupported` (the server does not offer the feature: the spec makes
it optional) and :class:`NotRun` (the suite chose not to run it, for a
:class:`NotRunReason`).  Both are pytest skips, so pytest counts them as such.
"""

from __future__ import annotations

import enum

# pytest.skip.Exception, under the name mypy accepts as a base class.
from _pytest.outcomes import Skipped


class Verdict(enum.Enum):
    """One check's verdict; members in order from worst to best."""

    ERROR = "error"  # the check could not be set up, or its teardown failed
    FAILED = "failed"
    XPASSED = "xpassed"  # an intermittent known deviation that did not show
    WARNING = "warning"  # a SHOULD (or MAY) requirement not met, without --strict
    KNOWN = "xfailed"  # a recorded deviation of the profile, failing as expected
    UNSUPPORTED = "unsupported"
    NOT_RUN = "not-run"
    SKIPPED = "skipped"  # the profile cannot be put in the configuration needed
    PASSED = "passed"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def worse_than(self, other: Verdict) -> bool:
        return self.rank < other.rank


_RANK = {verdict: i for i, verdict in enumerate(Verdict)}


class NotRunReason(enum.Enum):
    """Why the suite chose not to run a check."""

    WRITES = "writes"
    DISRUPTIVE = "disruptive"
    GONE = "server gone"

    @property
    def remedy(self) -> str:
        return _REMEDY[self]


_REMEDY = {
    NotRunReason.WRITES: "they write to the export: --allow-writes lets them",
    NotRunReason.DISRUPTIVE: (
        "they may crash, wedge or stop the server: --allow-disruptive lets them"
    ),
    NotRunReason.GONE: "the server stopped answering before their turn",
}


class Unsupported(Skipped):
    """The server does not offer the feature the check needs (verdict UNSUPPORTED)."""


class NotRun(Skipped):
    """The suite chose not to run the check (verdict NOT_RUN), for REASON."""

    def __init__(self, reason: NotRunReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


def decide(
    *,
    when: str,
    outcome: str,
    wasxfail: str | None,
    exception: BaseException | None,
    should_level: bool,
    strict: bool,
) -> Verdict:
    """The verdict of one phase report.

    OUTCOME is pytest's ("passed", "failed", "skipped"); EXCEPTION is what the
    phase raised, if anything; SHOULD_LEVEL says the check's requirement is a
    SHOULD or a MAY, whose assertion failures are warnings unless STRICT.
    """
    if wasxfail is not None:
        return Verdict.KNOWN if outcome == "skipped" else Verdict.XPASSED
    if outcome == "skipped":
        if isinstance(exception, Unsupported):
            return Verdict.UNSUPPORTED
        if isinstance(exception, NotRun):
            return Verdict.NOT_RUN
        return Verdict.SKIPPED
    if outcome == "failed":
        if when == "call" and should_level and not strict and isinstance(exception, AssertionError):
            return Verdict.WARNING
        return Verdict.FAILED if when == "call" else Verdict.ERROR
    return Verdict.PASSED
