"""The checks of metadata contexts with 64-bit status can fail: a toy server, one bug at a time.

No server available here offers such a context but the reference server, so
the checks of conformance/test_wide_contexts.py would never be seen failing.
tests/broken_servers/toy_wide.py offers one, ``x-toy:wide``.  Without bugs
every check passes, whether SET_META_CONTEXT omits the context or refuses
with NBD_REP_ERR_EXT_HEADER_REQD (the spec allows both); with one bug,
exactly the checks guarding against it fail (a check failing against
everything proves as little as one that never fails).  The LIST check is a
SHOULD: how the suite reports it (a warning, or a failure with
--nbd-strict) is tests/test_suite_can_fail.py's business.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any

import pytest

from conformance.spec import MARKER, SHOULD
from tests.broken_servers.toy_wide import WIDE, Behaviour, ToyWide

SET = "test_set_wide_context_without_extended_headers_omits_it_or_fails"
LIST = "test_list_advertising_wide_context_without_extended_headers_ends_ext_header_reqd"
WIDE_CHECKS: dict[str, tuple[str, dict[str, Any]]] = {
    # check ID: (function, parameters besides the server and the context)
    "set-alone": (SET, {"with_base": False}),
    "set-with-base": (SET, {"with_base": True}),
    "list-all": (LIST, {"queries": "none"}),
    "list-name": (LIST, {"queries": "its-name"}),
    "list-extended": ("test_list_of_wide_context_with_extended_headers_ends_with_ack", {}),
    "served-extended": ("test_wide_context_is_served_with_extended_headers", {}),
}
BUG_FAILS = {
    "wide_selected_without_extended": {"set-alone", "set-with-base"},
    "set_fails_invalid": {"set-alone", "set-with-base"},
    "set_drops_everything": {"set-with-base"},
    "list_ends_with_ack": {"list-all", "list-name"},
    "list_refused_with_extended": {"list-extended"},
    "compact_chunks_when_extended": {"served-extended"},
}


@pytest.fixture
def wide_checks(request: pytest.FixtureRequest) -> dict[str, Any]:
    """{check ID: a callable running it on a server}, the module imported once its markers
    are known (pytest runs with --strict-markers)."""
    known = " ".join(request.config.getini("markers"))
    if MARKER not in known:
        request.config.addinivalue_line("markers", f"{MARKER}: conformance marker")
    module = importlib.import_module("conformance.test_wide_contexts")
    return {
        name: functools.partial(getattr(module, function), wide_context=WIDE.decode(), **params)
        for name, (function, params) in WIDE_CHECKS.items()
    }


def _failures(server: ToyWide, checks: dict[str, Any]) -> dict[str, str]:
    """{check ID: why} for every check that does not pass (UNSUPPORTED counts as not passing)."""
    failed = {}
    for name, run in checks.items():
        try:
            run(server=server)
        except pytest.skip.Exception as exc:
            failed[name] = f"unsupported: {exc}"
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
    return failed


@pytest.mark.parametrize("refuse_set", [False, True], ids=["set-omits", "set-refuses"])
def test_toy_without_bugs_passes_the_checks(
    tmp_path: Path, wide_checks: dict[str, Any], refuse_set: bool
) -> None:
    server = ToyWide(tmp_path, Behaviour(refuse_set=refuse_set))
    try:
        assert _failures(server, wide_checks) == {}
    finally:
        server.close()


@pytest.mark.parametrize("bug", sorted(BUG_FAILS))
def test_each_bug_fails_exactly_its_checks(
    tmp_path: Path, wide_checks: dict[str, Any], bug: str
) -> None:
    server = ToyWide(tmp_path, Behaviour(**{bug: True}))
    try:
        failed = _failures(server, wide_checks)
    finally:
        server.close()
    assert set(failed) == BUG_FAILS[bug], failed
    for name, why in failed.items():
        assert why.startswith("SpecViolation"), (name, why)


def test_the_list_check_is_a_should_and_the_others_are_musts() -> None:
    module = importlib.import_module("conformance.test_wide_contexts")
    levels = {
        function: next(m for m in getattr(module, function).pytestmark if m.name == MARKER)
        for function, _ in WIDE_CHECKS.values()
    }
    should = {f for f, mark in levels.items() if mark.kwargs["level"] is SHOULD}
    assert should == {LIST}
