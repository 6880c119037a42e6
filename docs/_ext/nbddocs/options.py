"""Every command-line option is documented on its manual page, and nothing more."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging

from .common import (
    PYTEST_OWN_OPTIONS,
    REPO,
    SERVER_PAGE,
    SUITE_PAGE,
)

logger = logging.getLogger(__name__)


def server_options() -> dict[str, str]:
    """{option string: its help} for every argument of the reference server's CLI."""
    sys.path.insert(0, str(REPO))
    try:
        from reference_server.cli import build_parser
    finally:
        sys.path.remove(str(REPO))
    found: dict[str, str] = {}
    for action in build_parser()._actions:
        # A positional argument is documented under its name in capitals (FILENAME).
        names = list(action.option_strings) or [action.dest.upper()]
        for name in names:
            found[name] = action.help or ""
    return found


def _option_literals(path: Path) -> Iterator[str]:
    """Option strings passed to ``addoption``/``add_argument`` calls in PATH (ast)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("addoption", "add_argument", "_addoption")
        ):
            for arg in node.args:
                if (
                    isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)
                    and arg.value.startswith("-")
                ):
                    yield arg.value


def suite_options() -> set[str] | None:
    """Options the conformance plugin (and its ``nbd-conformance`` wrapper) adds."""
    sources = [REPO / "conformance" / "plugin.py", REPO / "conformance" / "cli.py"]
    present = [p for p in sources if p.exists()]
    if not (REPO / "conformance" / "plugin.py").exists():
        return None
    return {option for path in present for option in _option_literals(path)}


def check_options(app: Sphinx, env: BuildEnvironment) -> None:
    documented: dict[str, set[str]] = {}
    for (program, name), _target in env.get_domain("std").progoptions.items():  # type: ignore[attr-defined]
        documented.setdefault(program or "", set()).add(name)
    _compare("nbd-reference-server", SERVER_PAGE, set(server_options()), documented)
    suite = suite_options()
    if suite is None:
        logger.warning(
            "conformance/plugin.py not found: cannot check the options %s documents", SUITE_PAGE
        )
    else:
        _compare("nbd-conformance", SUITE_PAGE, suite | PYTEST_OWN_OPTIONS, documented)


def _compare(program: str, page: str, actual: set[str], documented: dict[str, set[str]]) -> None:
    have = documented.get(program, set())
    for option in sorted(actual - have):
        logger.warning(
            "%s option %s is not documented: add '.. option:: %s' to %s.rst",
            program,
            option,
            option,
            page,
            location=page,
        )
    for option in sorted(have - actual):
        logger.warning(
            "%s.rst documents %s %s, which the code no longer has",
            page,
            program,
            option,
            location=page,
        )
