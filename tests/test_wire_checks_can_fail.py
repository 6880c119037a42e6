"""The raw-wire checks can fail: each runs against a deliberately broken toy server.

No real server available here has these bugs (they were fixed years ago), so
the checks that guard against them would never be seen failing.  The toy
servers in tests/broken_servers/ (toy_tls.py for FORCEDTLS, toy_nbd.py in
clear) speak just enough NBD to run them; each flag switches on one
historical bug.  They exist for these tests only and are not part of the
suite or of the reference server.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conformance.spec import SpecViolation
from tests.broken_servers.toy_nbd import Bugs as NotlsBugs
from tests.broken_servers.toy_nbd import ToyServer as ToyNotls
from tests.broken_servers.toy_tls import Bugs, ToyServer
from tests.processes import die_with_parent, stop, wait_until


@pytest.fixture
def checks(request: pytest.FixtureRequest) -> SimpleNamespace:
    """The check modules, imported once their markers are known (pytest runs strict-markers)."""
    known = " ".join(request.config.getini("markers"))
    for marker in ("nbd_spec", "writes"):
        if marker not in known:
            request.config.addinivalue_line("markers", f"{marker}: conformance marker")
    names = ("test_cves_tls", "test_handshake", "test_tls")
    return SimpleNamespace(**{n[5:]: importlib.import_module(f"conformance.{n}") for n in names})


@contextlib.contextmanager
def toy(tmp_path: Path, **bugs: bool) -> Iterator[ToyServer]:
    server = ToyServer(tmp_path, Bugs(**bugs))
    try:
        yield server
    finally:
        server.close()


def test_toy_server_without_bugs_passes_the_checks(tmp_path: Path, checks: SimpleNamespace) -> None:
    with toy(tmp_path) as server:
        checks.tls.test_option_sent_with_starttls_is_not_answered_in_clear(server)
        checks.cves_tls.test_cve_2021_3716_plaintext_state_does_not_survive_starttls(
            server, "structured-reply"
        )
        checks.handshake.test_unknown_client_flag_drops_connection(server, 7)


def test_injection_check_fails_when_buffered_plaintext_is_answered(
    tmp_path: Path, checks: SimpleNamespace
) -> None:
    with (
        toy(tmp_path, answer_buffered_plaintext=True) as server,
        pytest.raises(SpecViolation, match="no plaintext reply"),
    ):
        checks.tls.test_option_sent_with_starttls_is_not_answered_in_clear(server)


def test_cve_2021_3716_check_fails_when_structured_replies_survive(
    tmp_path: Path, checks: SimpleNamespace
) -> None:
    with (
        toy(tmp_path, keep_structured_across_starttls=True) as server,
        pytest.raises(SpecViolation, match="a simple reply"),
    ):
        checks.cves_tls.test_cve_2021_3716_plaintext_state_does_not_survive_starttls(
            server, "structured-reply"
        )


def test_client_flag_check_fails_when_unknown_flags_are_ignored(
    tmp_path: Path, checks: SimpleNamespace
) -> None:
    with (
        toy(tmp_path, ignore_unknown_client_flags=True) as server,
        pytest.raises(SpecViolation, match="connection dropped"),
    ):
        checks.handshake.test_unknown_client_flag_drops_connection(server, 7)


# ------------------------------------------------- a toy server in clear, bug by bug
#
# tests/broken_servers/toy_nbd.py serves NOTLS with one switchable bug per field of its
# Bugs.  The raw-wire checks below run against it: all pass without a bug, and each bug
# makes exactly the checks that guard against it fail (a check failing against everything
# proves as little as one that never fails).

TOY_CHECKS = {
    # check ID: (module, function, arguments after the server)
    "cookies/simple": (
        "test_cookies",
        "test_every_reply_path_echoes_the_whole_cookie",
        ("simple",),
    ),
    "cookies/structured": (
        "test_cookies",
        "test_every_reply_path_echoes_the_whole_cookie",
        ("structured",),
    ),
    "unknown-command": ("test_commands", "test_unknown_command_gets_einval", ()),
    "unknown-flag": ("test_commands", "test_unknown_command_flag_gets_einval", ()),
    "cache-flag": ("test_commands", "test_cache_with_unknown_flag_is_rejected", ()),
    "disc-in-flight": ("test_commands", "test_disc_answers_requests_in_flight_then_closes", ()),
    "disc-closes": ("test_commands", "test_disc_closes_the_connection", ()),
    "chunk-flags": ("test_reply_chunks", "test_chunks_set_no_flag_but_done", ()),
    "error-once": ("test_reply_chunks", "test_error_chunk_at_most_once_per_reply", ()),
    "errors-structured": ("test_reply_chunks", "test_errors_are_sent_as_structured_replies", ()),
    "done-last": ("test_reply_chunks", "test_no_chunk_follows_the_done_chunk", ()),
    "unknown-info": ("test_option_replies", "test_unknown_information_requests_are_ignored", ()),
    "info-once": ("test_option_replies", "test_each_information_type_is_sent_once", ()),
    "no-nul": ("test_option_replies", "test_strings_the_server_sends_have_no_nul", ()),
    "context-names": ("test_meta_context_options", "test_context_names_are_valid_strings", ()),
    "list-ids-zero": ("test_meta_context_options", "test_listed_context_ids_are_zero", ()),
    "notls-starttls": ("test_tls", "test_starttls_without_tls_gets_policy_or_unsup", ()),
    "notls-no-tls-reqd": ("test_tls", "test_notls_server_never_answers_tls_reqd", ()),
    # These take start_server: the toy is the server every configuration gets.
    "error-values/write": (
        "test_error_values",
        "test_failed_request_carries_a_defined_error",
        ("write", "writable"),
    ),
    "error-values/cache": (
        "test_error_values",
        "test_failed_request_carries_a_defined_error",
        ("cache", "writable"),
    ),
    "options-answered": (
        "test_session_termination",
        "test_every_kind_of_option_is_answered_not_hung_up_on",
        (),
    ),
    "unwelcome-errors": (
        "test_session_termination",
        "test_an_unwelcome_client_gets_errors_not_a_hang_up",
        ("no-such-export",),
    ),
    "requests-answered": (
        "test_session_termination",
        "test_valid_requests_and_a_pause_do_not_end_transmission",
        (),
    ),
    "error-values/read": (
        "test_error_values",
        "test_failed_read_carries_a_defined_error",
        ("writable",),
    ),
}

# Every check that a bug's replies (with their 32-bit cookies) derail fails with it.
BIG_COOKIES = {
    "cookies/simple",
    "requests-answered",
    "cookies/structured",
    "unknown-command",
    "unknown-flag",
    "cache-flag",
    "disc-in-flight",
    "chunk-flags",
    "error-once",
    "errors-structured",
    "done-last",
}
BUG_FAILS = {
    "truncate_cookies": BIG_COOKIES,
    "disc_drops_requests_in_flight": {"disc-in-flight"},
    "disc_keeps_connection": {"disc-in-flight", "disc-closes"},
    "unknown_command_succeeds": {"unknown-command"},
    "ignore_unknown_flags": {"unknown-flag", "cache-flag"},
    "extra_reply_flag": {"chunk-flags"},
    "error_chunk_twice": {"error-once"},
    "simple_errors_under_structured": {"errors-structured"},
    "unknown_info_fails": {"unknown-info"},
    "info_repeated": {"info-once"},
    "nul_terminated_strings": {"no-nul", "context-names"},
    "list_context_ids": {"list-ids-zero"},
    "tls_reqd_in_notls": {"notls-starttls", "notls-no-tls-reqd"},
    # The checks that name the error they expect (EINVAL) catch it too.
    "hang_up_on_unknown_export": {"options-answered", "unwelcome-errors"},
    "hang_up_after_refusals": {"options-answered", "unwelcome-errors", "notls-no-tls-reqd"},
    "hang_up_when_idle": {"requests-answered"},
    "errors_in_host_order": {
        "error-values/write",
        "error-values/cache",
        "error-values/read",
        "unknown-command",
        "unknown-flag",
    },
}


@pytest.fixture
def toy_checks(request: pytest.FixtureRequest) -> dict[str, Any]:
    """{check ID: a callable running it on a server}, the modules imported as in ``checks``."""
    known = " ".join(request.config.getini("markers"))
    for marker in ("nbd_spec", "writes", "disruptive"):
        if marker not in known:
            request.config.addinivalue_line("markers", f"{marker}: conformance marker")
    found: dict[str, Any] = {}
    for name, (module, function, args) in TOY_CHECKS.items():
        check = getattr(importlib.import_module(f"conformance.{module}"), function)
        if "start_server" in inspect.signature(check).parameters:
            found[name] = functools.partial(
                lambda c, a, server: c(lambda config=None: server, *a), check, args
            )
        else:
            found[name] = functools.partial(lambda c, a, server: c(server, *a), check, args)
    return found


def _failures(server: object, checks: dict[str, Any]) -> dict[str, str]:
    """{check ID: why} for every check that does not pass (UNSUPPORTED counts as not passing)."""
    failed = {}
    for name, run in checks.items():
        try:
            run(server)
        except pytest.skip.Exception as exc:
            failed[name] = f"unsupported: {exc}"
        except (SpecViolation, AssertionError, OSError, Exception) as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
    return failed


def test_toy_notls_server_without_bugs_passes_the_checks(
    tmp_path: Path, toy_checks: dict[str, Any]
) -> None:
    server = ToyNotls(tmp_path, NotlsBugs())
    try:
        assert _failures(server, toy_checks) == {}
    finally:
        server.close()


@pytest.mark.parametrize("bug", sorted(BUG_FAILS))
def test_each_bug_fails_exactly_its_checks(
    tmp_path: Path, toy_checks: dict[str, Any], bug: str
) -> None:
    server = ToyNotls(tmp_path, NotlsBugs(**{bug: True}))
    try:
        failed = _failures(server, toy_checks)
    finally:
        server.close()
    assert set(failed) == BUG_FAILS[bug], failed
    for name, why in failed.items():
        # A check about something else reports a hang-up as what it is.
        hung_up = bug.startswith("hang_up") and why.startswith("Disconnected")
        assert why.startswith("SpecViolation") or hung_up, (name, why)


# ------------------------------------------- the reference server at NBD_CMD_DISC, in volume


def test_reference_server_answers_every_request_before_disc_in_volume(
    tmp_path: Path, checks: SimpleNamespace
) -> None:
    """16 READs of 256 KiB (more than a socket buffer holds) then NBD_CMD_DISC, against the
    reference server run from its command line: every reply must arrive whole.  The suite's
    own check sends 64 READs of 4 KiB, which the reference server survives."""
    commands = importlib.import_module("conformance.test_commands")
    sock = tmp_path / "reference.sock"
    argv = [sys.executable, "-m", "reference_server", "-k", str(sock), "-t", "-e", "0"]
    proc = subprocess.Popen(
        [*argv, "--memory", "64M"],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None, "the reference server", 20)
        server = SimpleNamespace(
            tls=False,
            tls_dir=None,
            export_name="",
            open_socket=lambda timeout=10.0: _unix_socket(sock, timeout),
        )
        commands.check_disc_answers_in_flight(
            server, commands.LARGE_IN_FLIGHT, commands.LARGE_READ_LENGTH
        )
    finally:
        stop(proc)


def _unix_socket(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock
