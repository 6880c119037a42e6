"""The protocol core (reference_server/protocol/) imports no I/O and no storage.

STYLE.md: "A protocol core that calls the backend is not sans-IO."  The core
turns bytes into validated requests and results into reply bytes; sockets,
asyncio, threads and backends belong to the transport (connection.py,
server.py) and the dispatch layer (dispatch.py).  Checked by reading the
import statements of every module of the package (nothing is imported).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "reference_server" / "protocol"
# Top-level modules that do I/O, run concurrently, or hold storage.
FORBIDDEN = {
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "select",
    "threading",
    "concurrent",
    "multiprocessing",
    "subprocess",
    "mmap",
}
MODULES = sorted(PACKAGE.glob("*.py"))


def imported(path: Path) -> list[str]:
    """Absolute names of what ``path`` imports (relative imports resolved)."""
    package = ["reference_server", "protocol"]
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            names += [f"{prefix}.{alias.name}" for alias in node.names]
    return names


def test_the_package_has_modules() -> None:
    assert {p.name for p in MODULES} >= {"handshake.py", "transmission.py", "phases.py"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_protocol_module_imports_neither_io_nor_backends(path: Path) -> None:
    for name in imported(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN, f"{path.name} imports {name}: the core must not do I/O"
        if top == "reference_server":
            assert name.startswith("reference_server.protocol."), (
                f"{path.name} imports {name}: the core may import only itself and the stdlib"
            )


def test_the_checker_sees_relative_imports_of_backends(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from ..backends.base import Backend\nfrom . import wire\nimport asyncio.events\n"
    )
    assert imported(bad) == [
        "reference_server.backends.base.Backend",
        "reference_server.protocol.wire",
        "asyncio.events",
    ]
