"""The spec's own conformance sets, "Baseline" and "Maximum interoperability", as data.

"Compatibility and interoperability" in ``docs/spec/proto.md`` lists what
every implementation MUST implement (Baseline) and what those wanting
maximum interoperability SHOULD implement.  The list items name features,
not checks, so each item is kept here beside the checks that exercise it:
a :class:`Feature` holds the item's sentence verbatim (a unit test checks
that it still appears in the spec) and globs over check node IDs (a unit
test checks that every glob still matches a check of the suite).

A server *meets* a set when every feature of the set was exercised by at
least one check that passed and none of the set's checks failed; see
:func:`score` for the exact rule.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase

#: The heading path of the section the sets come from.
SECTION = "Compatibility and interoperability"


@dataclasses.dataclass(frozen=True)
class Feature:
    """One item of a set: the spec's sentence and the checks that exercise it."""

    sentence: str
    nodeids: tuple[str, ...]

    def covers(self, nodeid: str) -> bool:
        return any(fnmatchcase(nodeid, pattern) for pattern in self.nodeids)


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    name: str
    heading: str
    #: The sentence that introduces the list (its level: MUST or SHOULD).
    preamble: str
    features: tuple[Feature, ...]

    def covers(self, nodeid: str) -> bool:
        return any(f.covers(nodeid) for f in self.features)


def _t(module: str, *names: str) -> tuple[str, ...]:
    return tuple(f"conformance/test_{module}.py::{name}" for name in names)


BASELINE = FeatureSet(
    name="Baseline",
    heading=f"{SECTION} / Baseline",
    preamble="The following MUST be implemented by all implementations, and should be "
    "considered a baseline:",
    features=(
        Feature("NOTLS mode", _t("handshake", "test_greeting_*", "test_server_sets_*")),
        Feature(
            "The fixed newstyle handshake",
            _t("handshake", "test_server_sets_fixed_newstyle", "test_option_with_bad_magic_*")
            + _t("options", "test_option_reply_*"),
        ),
        Feature(
            "the `NBD_OPT_INFO` and `NBD_OPT_GO` messages, with the `NBD_INFO_EXPORT` response.",
            _t(
                "options",
                "test_success_includes_info_export*",
                "test_go_repeats_what_info_said",
                "test_info_replies_have_specified_lengths",
                "test_unknown_export_gets_err_unknown*",
            )
            + _t("handshake", "test_go_sends_no_zero_padding", "test_transmission_flags_*[[]go]")
            + _t("info", "test_export_size_is_the_configured_size", "test_named_export_is_served"),
        ),
        Feature(
            "Servers that receive messages which they do not implement MUST reply to them "
            "with `NBD_REP_ERR_UNSUP`, and MUST NOT fail to parse the next message received.",
            _t("options", "test_unknown_option_gets_err_unsup*", "test_unknown_option_payload_*"),
        ),
        Feature("the `NBD_OPT_ABORT` message, and its response.", _t("options", "test_abort_*")),
        Feature(
            "the `NBD_OPT_LIST` message and its response.",
            _t(
                "options",
                "test_list_includes_the_export",
                "test_list_replies_are_servers_then_ack",
                "test_list_with_data_*",
            ),
        ),
        Feature(
            "Simple replies",
            _t("handshake", "test_simple_reply_echoes_cookie")
            + _t("read", "test_read_with_simple_replies")
            + _t("structured_reply", "test_simple_replies_without_negotiation*"),
        ),
        Feature(
            "the `NBD_CMD_READ` message (and its response)",
            _t("read", "test_read_returns_what_was_written*", "test_many_reads_in_flight_*"),
        ),
        Feature(
            "the `NBD_CMD_WRITE` message (and its response), unless the implementation is a "
            "client that does not wish to write",
            _t(
                "write",
                "test_later_write_wins_*",
                "test_small_unaligned_write_*",
                "test_write_of_maximum_payload",
                "test_many_writes_in_flight_*",
            ),
        ),
        Feature(
            "the `NBD_CMD_DISC` message (and its resulting effects, although no response is "
            "involved)",
            _t("write", "test_flushed_write_survives_disconnect"),
        ),
    ),
)

MAXIMUM_INTEROPERABILITY = FeatureSet(
    name="Maximum interoperability",
    heading=f"{SECTION} / Maximum interoperability",
    preamble="Clients and servers that desire maximum interoperability SHOULD implement the "
    "following features:",
    features=(
        Feature(
            "TLS-encrypted communication, which may be required by some implementations or "
            "configurations;",
            _t("tls", "test_*") + _t("cves_tls", "test_cve_2019_14850_*", "test_cve_2021_3716_*"),
        ),
        Feature(
            "Servers that implement size constraints through `NBD_INFO_BLOCK_SIZE` and desire "
            "maximum interoperability SHOULD NOT require them.",
            _t("write", "test_default_maximum_payload_without_block_size_request")
            + _t("info", "test_*block_size*", "test_maximum_payload_*"),
        ),
        Feature(
            "Clients or servers that desire interoperability with older implementations SHOULD "
            "implement the `NBD_OPT_EXPORT_NAME` message in addition to `NBD_OPT_INFO` and "
            "`NBD_OPT_GO`.",
            _t(
                "handshake",
                "test_export_name_sends_124_zeroes_*",
                "test_no_zeroes_omits_zeroes_after_export_name",
                "test_transmission_flags_*[[]export_name]",
            )
            + _t("cves_negotiation", "test_cve_2017_15118_long_export_name[[]EXPORT_NAME-*]"),
        ),
        Feature(
            "For data safety, implementing `NBD_CMD_FLUSH` and the `NBD_CMD_FLAG_FUA` flag to "
            "`NBD_CMD_WRITE` is strongly recommended.",
            _t("flush_fua", "test_*") + _t("write", "test_flushed_write_survives_disconnect"),
        ),
    ),
)

SETS: tuple[FeatureSet, ...] = (BASELINE, MAXIMUM_INTEROPERABILITY)

#: Verdicts that show the server doing what the check asks (a SHOULD-level
#: warning still shows the feature implemented; an unexpected pass of a known
#: deviation is the server behaving).
GOOD = frozenset({"passed", "warning", "xpassed"})
#: Verdicts that show the server not doing it (a known deviation is still a deviation).
BAD = frozenset({"failed", "error", "xfailed", "server-gone"})
#: The server said it does not offer what the check needs.
UNSUPPORTED = "unsupported"


class Status(enum.Enum):
    MET = "met"
    NOT_MET = "not met"
    UNDETERMINED = "undetermined"


@dataclasses.dataclass(frozen=True)
class FeatureScore:
    feature: Feature
    good: tuple[str, ...]
    bad: tuple[str, ...]
    unsupported: tuple[str, ...]
    other: tuple[str, ...]

    @property
    def status(self) -> Status:
        if self.bad or (self.unsupported and not self.good):
            return Status.NOT_MET
        if self.good:
            return Status.MET
        return Status.UNDETERMINED


@dataclasses.dataclass(frozen=True)
class SetScore:
    feature_set: FeatureSet
    features: tuple[FeatureScore, ...]

    @property
    def status(self) -> Status:
        statuses = {f.status for f in self.features}
        if Status.NOT_MET in statuses:
            return Status.NOT_MET
        if statuses == {Status.MET}:
            return Status.MET
        return Status.UNDETERMINED

    @property
    def checks(self) -> int:
        return len({n for f in self.features for n in (*f.good, *f.bad, *f.unsupported, *f.other)})

    def reasons(self) -> list[str]:
        """Why the set is not met (or not determined), one line per feature, for people.

        Only the features that decide the status: those not met when the
        set is not met, those undetermined when it is undetermined.
        """
        lines = []
        status = self.status
        for f in self.features:
            if f.status is not status or status is Status.MET:
                continue
            if f.bad:
                lines.append(f"{f.feature.sentence} -- failing: {', '.join(_ids(f.bad))}")
            elif f.unsupported and not f.good:
                unsupported = ", ".join(_ids(f.unsupported))
                lines.append(f"{f.feature.sentence} -- unsupported: {unsupported}")
            else:
                lines.append(f"{f.feature.sentence} -- no check ran")
        return lines

    def to_json(self) -> dict[str, object]:
        return {
            "status": self.status.value,
            "checks": self.checks,
            "reasons": self.reasons(),
        }


def _ids(nodeids: Iterable[str]) -> list[str]:
    return [n.rsplit("::", 1)[-1] for n in nodeids]


def score(feature_set: FeatureSet, outcomes: Mapping[str, str]) -> SetScore:
    """Score one server against FEATURE_SET from its verdicts (nodeid -> outcome).

    A feature is met when at least one of its checks shows it working and
    none shows it broken; it is not met when one is broken, or when the
    server declared every check of it unsupported; otherwise (nothing ran:
    skipped, not run, unknown verdicts) it is undetermined.  The set is met
    when every feature is, not met when any feature is not.
    """
    scores = []
    for feature in feature_set.features:
        good: list[str] = []
        bad: list[str] = []
        unsupported: list[str] = []
        other: list[str] = []
        for nodeid, outcome in sorted(outcomes.items()):
            if not feature.covers(nodeid):
                continue
            if outcome in GOOD:
                good.append(nodeid)
            elif outcome in BAD:
                bad.append(nodeid)
            elif outcome == UNSUPPORTED:
                unsupported.append(nodeid)
            else:
                other.append(nodeid)
        scores.append(
            FeatureScore(feature, tuple(good), tuple(bad), tuple(unsupported), tuple(other))
        )
    return SetScore(feature_set, tuple(scores))


def sets_of(nodeid: str) -> list[str]:
    """The names of the sets a check belongs to."""
    return [s.name for s in SETS if s.covers(nodeid)]
