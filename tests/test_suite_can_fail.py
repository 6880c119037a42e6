"""The conformance suite's important checks can fail: slices of it run against broken servers.

Each server in tests/broken_servers/ is the reference server with one bug
patched in (a per-connection cache behind NBD_FLAG_CAN_MULTI_CONN, MULTI_CONN
under a connection limit of 1, EINVAL where EPERM is due, options acted on
across STARTTLS, a list of contexts with 64-bit status that ends in ACK).
Each test runs the slice of the suite that guards against that bug, as a user
would (``pytest conformance --server-cmd ... --report``), and asserts from the
JSON report that exactly the checks guarding against the bug fail (or warn,
for a SHOULD), and that every other check of the slice passes or is
unsupported: a check that fails against everything proves as little as one
that never fails.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.suite_runs import run_pytest

REPO = Path(__file__).resolve().parents[1]
BROKEN = Path(__file__).resolve().parent / "broken_servers"
# The reference server's own options, filled in by the suite per configuration.
OPTIONS = (
    "-k {socket} -t -e {shared} -x {export} -D {description} --memory {size} "
    "{read_only:-r} {tls:--tls-creds={tls_dir}}"
)
RUN_TIMEOUT = 120


@dataclass
class Run:
    """The verdicts of one run of the suite, by check ID (function name and parameters)."""

    outcomes: dict[str, str]
    messages: dict[str, str]
    output: str

    def having(self, *outcomes: str) -> set[str]:
        return {check for check, outcome in self.outcomes.items() if outcome in outcomes}

    def assert_verdicts(
        self, failed: AbstractSet[str] = frozenset(), warnings: AbstractSet[str] = frozenset()
    ) -> None:
        """Exactly FAILED fail and WARNINGS warn; everything else passes or is unsupported."""
        assert self.having("failed", "error") == failed, self.output
        assert self.having("warning") == warnings, self.output
        others = set(self.outcomes) - failed - warnings
        assert self.having("passed", "unsupported") == others, self.output


def run_suite(tmp_path: Path, launcher: str, *selection: str, strict: bool = False) -> Run:
    """``pytest conformance -n 2 --server-cmd '<launcher> OPTIONS' SELECTION`` in a subprocess."""
    report = tmp_path / "report.json"
    template = f"{sys.executable} {BROKEN / launcher} {OPTIONS}"
    argv = [*selection, "-n", "2", "-q", "--server-cmd", template, f"--report={report}"]
    if strict:
        argv.append("--nbd-strict")
    returncode, document, output = run_pytest(argv, report, RUN_TIMEOUT)
    assert returncode in (0, 1), output[-4000:]
    assert document["profile"] == "command"
    assert document["strict"] is strict
    checks = document["checks"]
    ids = [c["id"] for c in checks]
    assert len(set(ids)) == len(ids), "check IDs of the slice are not unique"
    return Run(
        outcomes={c["id"]: c["outcome"] for c in checks},
        messages={c["id"]: c["message"] for c in checks},
        output=output[-6000:],
    )


# ------------------------------------------------- a per-connection cache under MULTI_CONN

VISIBILITY = "test_flush_or_fua_makes_writes_visible_on_every_connection"
# test_multiconn.py's parameters: operation, roles (A writes, B or A flushes or the write
# carries FUA, some connection reads) and whether the reader read the old data first.
VISIBILITY_ID = re.compile(
    rf"{VISIBILITY}\[(?P<operation>write|write-zeroes|trim)-"
    r"write-(?:fua-)?(?P<writer>[ABC])\.(?:flush-(?P<syncer>[ABC])\.)?read-(?P<reader>[ABC])"
    r"-(?P<primed>reader-read-first)?\]"
)


def visibility_failures(run: Run, fails: Callable[..., bool]) -> set[str]:
    """The parametrised visibility checks for which FAILS(operation, w, s, r, primed) holds."""
    expected = set()
    for check in run.outcomes:
        if check.startswith(VISIBILITY + "["):
            m = VISIBILITY_ID.fullmatch(check)
            assert m is not None, f"unknown parameters: {check}"
            args = m["operation"], m["writer"], m["syncer"], m["reader"], bool(m["primed"])
            if fails(*args):
                expected.add(check)
    # 3 operations x 5 role patterns x primed or not: none may silently vanish.
    assert sum(c.startswith(VISIBILITY + "[") for c in run.outcomes) == 30
    return expected


MULTICONN = "conformance/test_multiconn.py"
CONCURRENT = "test_concurrent_writers_on_disjoint_ranges_lose_nothing"
MODEL_FILE = "conformance/test_model.py"
MODEL = "test_random_command_sequences_match_the_model"


def assert_model_shrank(run: Run) -> None:
    """The model check ends in hypothesis's minimal sequence and the command replaying it
    (not in FlakyStrategyDefinition, as when examples shared connections)."""
    message = run.messages[MODEL]
    assert "Flaky" not in message, message
    assert "state = ExportMachine()" in message, message
    assert "replay just this sequence: NBD_MODEL_REPLAY='" in message, message


def test_cache_written_back_only_at_disconnect(tmp_path: Path) -> None:
    """Flush and FUA do nothing: a reader other than the writer sees none of its writes.

    Every variant in which the old data must be seen by another connection
    fails: the reader that read it first, or else the bystander that checks
    it before the operation (without that check, write-zeroes and trim would
    pass here, the reader's zeroes being what it should see)."""
    run = run_suite(
        tmp_path,
        "per_connection_cache.py write-back-at-disconnect",
        MULTICONN,
        MODEL_FILE,
    )

    def fails(operation, writer, syncer, reader, primed):
        return not primed or reader != writer

    expected = visibility_failures(run, fails) | {CONCURRENT, MODEL}
    assert len(expected) == 29
    run.assert_verdicts(failed=expected)
    assert "all stripes read on a fifth connection" in run.messages[CONCURRENT]
    assert_model_shrank(run)


def test_cache_flush_writes_back_only_its_own_connection(tmp_path: Path) -> None:
    """FLUSH and FUA write back the sender's cache only: a flush on B leaves A's writes
    unseen by B and C, and A's cached trim disagrees with what B and C read.  Whole pages
    written back from stale copies also lose the concurrent writers' stripes."""
    run = run_suite(
        tmp_path, "per_connection_cache.py flush-writes-back-own", MULTICONN, MODEL_FILE
    )

    def fails(operation, writer, syncer, reader, primed):
        return syncer not in (None, writer) and (reader != writer or operation == "trim")

    expected = visibility_failures(run, fails) | {CONCURRENT, MODEL}
    assert len(expected) == 16
    run.assert_verdicts(failed=expected)
    assert_model_shrank(run)


def test_stale_read_cache(tmp_path: Path) -> None:
    """Writes are shared at once, but a connection that read the old data keeps serving it:
    the reader-read-first variants (the nbd-multiconn iotest scenario) see it, and so do
    the trims, where the bystander that checked the old data must agree afterwards."""
    run = run_suite(tmp_path, "per_connection_cache.py stale-read-cache", MULTICONN, MODEL_FILE)

    def fails(operation, writer, syncer, reader, primed):
        return (primed and reader != writer) or (operation == "trim" and not primed)

    expected = visibility_failures(run, fails)
    assert len(expected) == 17
    run.assert_verdicts(failed=expected | {MODEL})
    for check in expected:
        assert "first difference" in run.messages[check]
    assert_model_shrank(run)


# -------------------------------------------------- MULTI_CONN under a connection limit of 1

LIMIT_CHECKS = "multi_conn or connection_limit"
READ_ONLY_REGRESSION = "test_readonly_single_connection_does_not_advertise_multi_conn"
LIMIT_OF_ONE = "test_single_connection_does_not_advertise_multi_conn"


def test_multi_conn_on_read_only_exports_whatever_the_limit(tmp_path: Path) -> None:
    """qemu-nbd's ``-r`` without ``-e`` regression: only the check named after it fails;
    the read-only checks still pass (the export is read-only, and correctly so)."""
    run = run_suite(
        tmp_path,
        "multi_conn_single_connection.py read-only",
        MULTICONN,
        "conformance/test_readonly.py",
        "-k",
        f"{LIMIT_CHECKS} or test_readonly",
    )
    assert len(run.outcomes) == 12
    run.assert_verdicts(failed={READ_ONLY_REGRESSION})
    assert "advertised, and a second connection failed" in run.messages[READ_ONLY_REGRESSION]


def test_multi_conn_always(tmp_path: Path) -> None:
    run = run_suite(
        tmp_path, "multi_conn_single_connection.py always", MULTICONN, "-k", LIMIT_CHECKS
    )
    assert len(run.outcomes) == 4
    run.assert_verdicts(failed={READ_ONLY_REGRESSION, LIMIT_OF_ONE})


# ------------------------------------------------------- EINVAL where EPERM is due (SHOULD)

EPERM_CHECKS = {
    "test_write_and_trim_get_eperm[write]",
    "test_write_and_trim_get_eperm[trim]",
    "test_write_zeroes_gets_eperm",
}


@pytest.mark.parametrize("strict", [False, True], ids=["default", "nbd-strict"])
def test_einval_instead_of_eperm(tmp_path: Path, strict: bool) -> None:
    """A SHOULD: a warning by default, a failure with --nbd-strict.  The MUST (refuse the
    write, change nothing) still holds, and its checks pass."""
    run = run_suite(tmp_path, "einval_not_eperm.py", "conformance/test_readonly.py", strict=strict)
    assert len(run.outcomes) == 8
    if strict:
        run.assert_verdicts(failed=EPERM_CHECKS)
    else:
        run.assert_verdicts(warnings=EPERM_CHECKS)
    for check in EPERM_CHECKS:
        assert "expected error EPERM (1), actual error EINVAL (22)" in run.messages[check]


# ------------------------------------------------------------- acting on data sent in clear

TLS_CHECKS = ("conformance/test_tls.py", "conformance/test_cves_tls.py")
CVE_2021_3716 = (
    "test_cve_2021_3716_plaintext_state_does_not_survive_starttls[structured-reply]",
    "test_cve_2021_3716_plaintext_state_does_not_survive_starttls[meta-context]",
    "test_cve_2021_3716_plaintext_state_does_not_survive_starttls[extended-headers]",
)


def test_clear_text_options_answered_and_kept_across_starttls(tmp_path: Path) -> None:
    """CVE-2021-3716 as nbdkit had it: STRUCTURED_REPLY and SET_META_CONTEXT answered in
    clear (two FORCEDTLS failures) and still in force after STARTTLS (the CVE check)."""
    run = run_suite(tmp_path, "starttls_keeps_clear_state.py answered", *TLS_CHECKS)
    assert len(run.outcomes) == 30
    run.assert_verdicts(
        failed={
            "test_option_before_starttls_gets_tls_reqd[structured_reply]",
            "test_option_before_starttls_gets_tls_reqd[set_meta_context]",
            *CVE_2021_3716,
        }
    )


def test_clear_text_options_refused_yet_kept_across_starttls(tmp_path: Path) -> None:
    """The reply in clear is the right ERR_TLS_REQD, yet the options took effect: only the
    CVE check, which looks at what happens after STARTTLS, can tell."""
    run = run_suite(
        tmp_path,
        "starttls_keeps_clear_state.py silent",
        *TLS_CHECKS[:2],
        "-k",
        "tls_reqd or 3716",
    )
    assert len(run.outcomes) == 15
    run.assert_verdicts(failed=set(CVE_2021_3716))
    assert "expected 'a simple reply'" in run.messages[CVE_2021_3716[0]]


def test_option_pipelined_behind_starttls_answered_in_clear(tmp_path: Path) -> None:
    run = run_suite(tmp_path, "starttls_answers_buffered.py", *TLS_CHECKS)
    assert len(run.outcomes) == 30
    check = "test_option_sent_with_starttls_is_not_answered_in_clear"
    run.assert_verdicts(failed={check})
    assert "no plaintext reply to the buffered NBD_OPT_LIST" in run.messages[check]


# ------------------------------------------------------------- a fast zero the slow way


@pytest.mark.parametrize("mode", ["slow-success", "slow-failure"])
def test_fast_zero_taking_the_slow_path(tmp_path: Path, mode: str) -> None:
    """NBD_CMD_FLAG_FAST_ZERO served by a slow path (0.3 s), whether it then succeeds or
    fails with NBD_ENOTSUP: the timing check fails, the others of the file pass."""
    run = run_suite(
        tmp_path, f"slow_fast_zero.py {mode}", "conformance/test_trim_zero.py", "-k", "fast_zero"
    )
    check = "test_fast_zero_is_quicker_than_a_write_or_fails_quickly"
    run.assert_verdicts(failed={check})
    # Every round is listed with its times, and says how the fast zero ended.
    assert run.messages[check].count("the WRITE took") == 3, run.messages[check]
    ended = "succeeded in" if mode == "slow-success" else "failed with ENOTSUP in"
    assert run.messages[check].count(ended) == 3, run.messages[check]


# --------------------------------------------- alignment nobody asked for


def test_alignment_required_of_a_client_that_asked_for_no_sizes(tmp_path: Path) -> None:
    """512-byte alignment enforced without being advertised: the default-sizes check warns
    (a SHOULD); the checks that write whole blocks pass."""
    run = run_suite(tmp_path, "aligned_by_default.py", "conformance/test_write.py", "-k", "default")
    check = "test_default_minimum_and_preferred_block_sizes_without_block_size_request"
    run.assert_verdicts(warnings={check})


# ------------------------------- a context with 64-bit status listed, then ACK (SHOULD)

WIDE_LIST = "test_list_advertising_wide_context_without_extended_headers_ends_ext_header_reqd"


@pytest.mark.parametrize("strict", [False, True], ids=["default", "nbd-strict"])
def test_wide_context_listed_without_ext_header_reqd(tmp_path: Path, strict: bool) -> None:
    """A SHOULD: a warning by default, a failure with --nbd-strict; the context named with
    --wide-context, as for any server the suite has no profile of.  SET_META_CONTEXT still
    omits it, and the checks of that MUST pass."""
    run = run_suite(
        tmp_path,
        "wide_list_ends_with_ack.py --next-data",
        "conformance/test_wide_contexts.py",
        "--wide-context=x-reference:next-data",
        strict=strict,
    )
    assert len(run.outcomes) == 6
    listed = {f"{WIDE_LIST}[none]", f"{WIDE_LIST}[its-name]"}
    if strict:
        run.assert_verdicts(failed=listed)
    else:
        run.assert_verdicts(warnings=listed)
    assert "expected 'ERR_EXT_HEADER_REQD', actual 'ACK'" in run.messages[f"{WIDE_LIST}[none]"]
