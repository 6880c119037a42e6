"""The check of a READ above 4 GiB can fail, and passes a server that splits such a read.

No server at hand serves a read that large (they refuse it, as they may), so the
check would only ever be seen unsupported.  tests/broken_servers/toy_huge_read.py
answers it three ways: split into a data chunk and a hole chunk (passes, without
4 GiB on the wire), refused with NBD_EOVERFLOW (unsupported), or in one data
chunk whose 32-bit length wrapped around (fails).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conformance.spec import SpecViolation
from tests.broken_servers.toy_huge_read import ToyHugeRead

CHECK = "test_read_above_4_gib_is_split_into_chunks_or_refused"


@pytest.fixture
def check(request: pytest.FixtureRequest) -> Any:
    """The check, its module imported once the suite's markers are known."""
    known = " ".join(request.config.getini("markers"))
    for marker in ("nbd_spec", "writes"):
        if marker not in known:
            request.config.addinivalue_line("markers", f"{marker}: conformance marker")
    return getattr(importlib.import_module("conformance.test_read"), CHECK)


@pytest.fixture
def toy(tmp_path: Path) -> Iterator[Any]:
    started: list[ToyHugeRead] = []

    def start(mode: str) -> ToyHugeRead:
        started.append(ToyHugeRead(tmp_path, mode))
        return started[-1]

    yield start
    for server in started:
        server.close()


def test_a_split_read_passes(check: Any, toy: Any) -> None:
    server = toy("split")
    check(lambda config: server)


def test_a_refused_read_is_unsupported(check: Any, toy: Any) -> None:
    server = toy("refuse")
    with pytest.raises(pytest.skip.Exception, match="EOVERFLOW"):
        check(lambda config: server)


def test_a_chunk_length_that_wrapped_around_fails(check: Any, toy: Any) -> None:
    server = toy("overflow")
    with pytest.raises(SpecViolation, match="OFFSET_DATA length"):
        check(lambda config: server)
