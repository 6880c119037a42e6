"""The SELECTIVETLS checks can fail: each runs against a toy server with one bug at a time.

tests/broken_servers/toy_selective.py serves a plain export and a TLS-only one
(SELECTIVETLS), or plays FORCEDTLS or NOTLS for the checks that start such a
server.  Without bugs every check of conformance/test_selective_tls.py passes;
with one bug, exactly the checks guarding against it fail (a check failing
against everything proves as little as one that never fails).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conformance.servers.base import ServerConfig
from conformance.spec import SpecViolation
from tests.broken_servers.toy_selective import Bugs, ToySelective

SELECTIVE_CHECKS: dict[str, tuple[str, tuple[str, ...]]] = {
    # check ID: (function, arguments after the server)
    "starttls": ("test_selective_starttls_gets_ack_then_tls", ()),
    "second-starttls": ("test_selective_second_starttls_gets_err_invalid", ()),
    "info-go": ("test_selective_info_and_go_on_tls_only_export_get_tls_reqd", ()),
    "export-name": ("test_selective_export_name_on_tls_only_export_terminates", ()),
    "tls-reqd-only-info-go": (
        "test_selective_tls_reqd_only_for_info_and_go_on_tls_only_or_unknown",
        (),
    ),
    "no-tls-reqd-over-tls": ("test_selective_no_tls_reqd_after_starttls", ()),
    "hidden": ("test_selective_server_hiding_unknown_exports_reveals_nothing_of_tls_only_ones", ()),
    "mode-kept": ("test_mode_is_kept_for_the_whole_connection", ()),
}
# Checks that start servers of their own (start_server is the toy's stand-in).
STARTING_CHECKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "non-fixed-served": ("test_client_without_fixed_newstyle_gets_the_plain_export", ()),
    "non-fixed-no-tls-reqd": ("test_client_without_fixed_newstyle_never_gets_tls_reqd", ()),
}
BUG_FAILS = {
    "starttls_only_first": {"starttls", "second-starttls", "mode-kept"},
    "second_starttls_unsupported": {"second-starttls"},
    "tls_only_go_unknown": {"info-go"},
    "export_name_ignores_tls": {"export-name"},
    "tls_reqd_for_meta_context": {"tls-reqd-only-info-go"},
    "tls_reqd_for_unknown_over_tls": {"no-tls-reqd-over-tls"},
    "info_before_tls_reqd": {"hidden"},
    "forced_after_tls_only_asked": {"mode-kept"},
    "refuse_non_fixed_with_tls": {"non-fixed-served"},
    "tls_reqd_to_non_fixed": {"non-fixed-no-tls-reqd"},
}


@pytest.fixture
def module(request: pytest.FixtureRequest) -> Any:
    """conformance/test_selective_tls.py, imported once its markers are known."""
    known = " ".join(request.config.getini("markers"))
    for marker in ("nbd_spec", "writes"):
        if marker not in known:
            request.config.addinivalue_line("markers", f"{marker}: conformance marker")
    return importlib.import_module("conformance.test_selective_tls")


class Toys:
    """The toy servers of one test, by mode; closed together."""

    def __init__(self, directory: Path, bugs: Bugs) -> None:
        self.directory, self.bugs = directory, bugs
        self.started: dict[str, ToySelective] = {}

    def get(self, mode: str) -> ToySelective:
        if mode not in self.started:
            self.started[mode] = ToySelective(self.directory, self.bugs, mode)
        return self.started[mode]

    def start_server(self, config: ServerConfig) -> ToySelective:
        """What the checks' start_server gives: FORCEDTLS for tls=True, else NOTLS."""
        return self.get("forced" if config.tls else "notls")

    def close(self) -> None:
        for toy in self.started.values():
            toy.close()


@pytest.fixture
def toys(tmp_path: Path) -> Iterator[Callable[[Bugs], Toys]]:
    made: list[Toys] = []

    def make(bugs: Bugs) -> Toys:
        made.append(Toys(tmp_path, bugs))
        return made[-1]

    yield make
    for toy_set in made:
        toy_set.close()


def _failures(module: Any, toys: Toys) -> dict[str, str]:
    """{check ID: why} for every check that does not pass (UNSUPPORTED counts as not passing)."""
    runs: dict[str, Callable[[], object]] = {}
    for name, (function, args) in SELECTIVE_CHECKS.items():
        check = getattr(module, function)
        runs[name] = functools.partial(check, toys.get("selective"), *args)
    for name, (function, args) in STARTING_CHECKS.items():
        check = getattr(module, function)
        if function.endswith("plain_export"):
            runs[name] = functools.partial(check, toys.get("selective"), toys.start_server)
        else:
            runs[name] = functools.partial(check, toys.start_server, *args)
    failed = {}
    for name, run in runs.items():
        try:
            run()
        except pytest.skip.Exception as exc:
            failed[name] = f"unsupported: {exc}"
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
    return failed


def test_toy_without_bugs_passes_every_selective_check(module: Any, toys: Callable) -> None:
    assert _failures(module, toys(Bugs())) == {}


@pytest.mark.parametrize("bug", sorted(BUG_FAILS))
def test_each_bug_fails_exactly_its_checks(module: Any, toys: Callable, bug: str) -> None:
    failed = _failures(module, toys(Bugs(**{bug: True})))
    assert set(failed) == BUG_FAILS[bug], failed
    for name, why in failed.items():
        assert why.startswith(SpecViolation.__name__), (name, why)
