"""The layers hold: no import cycle, and no import against the direction of the layers.

Two modules that import each other are one concept split wrongly, or two
concepts missing a third (an interface both depend on).  Every import
counts, the ones inside functions too (a late import hides a cycle, it does
not remove it).  Read statically: nothing is imported.

The layers (README, "Layout"):

- reference server: protocol core (``protocol/``) -> dispatch and backends ->
  transport (connection, admission, server) -> command line;
- conformance suite: targets and wire codecs -> clients -> profiles (the
  harness) -> plugin -> checks; and it never imports the reference server.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("reference_server", "conformance")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> Iterator[str]:
    """Every module PATH imports (at any depth of its code), as dotted names."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                parent = ".".join(base)
            else:
                parent = ""
            origin = ".".join(p for p in (parent, node.module or "") if p)
            if node.module is not None:
                yield origin
            # "from pkg import name": name may be a submodule.
            yield from (f"{origin}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    modules = {
        _module_name(path): path
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {t for t in _imports(path, name) if t in modules and t != name}
        # A package's own __init__ is not a dependency of its submodules in any
        # sense that matters for layering ("from . import messages").
        graph[name] = {t for t in targets if not name.startswith(t + ".")}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that import each other, in cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_no_module_imports_itself_through_others() -> None:
    assert strongly_connected(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]


# (importer prefix, imported prefix): imports against the layers.
FORBIDDEN = [
    ("conformance", "reference_server"),  # an oracle must not share code with what it judges
    ("reference_server.protocol", "reference_server.backends"),  # the core is sans-IO
    ("reference_server.protocol", "reference_server.dispatch"),
    ("reference_server.protocol", "reference_server.connection"),
    ("reference_server.protocol", "reference_server.server"),
    ("reference_server.dispatch", "reference_server.connection"),
    ("reference_server.backends", "reference_server.dispatch"),  # storage builds no replies
    ("reference_server.backends", "reference_server.connection"),
    ("reference_server.connection", "reference_server.server"),
    ("reference_server.connection", "reference_server.cli"),
    ("conformance.target", "conformance.servers"),
    ("conformance.handle", "conformance.servers"),
    ("conformance.watchdog", "conformance"),
    ("conformance.wire", "conformance.servers"),
    ("conformance.servers", "conformance.plugin"),
    ("conformance.servers", "conformance.fixtures"),
    ("conformance.fixtures", "conformance.plugin"),
]


@pytest.mark.parametrize(("importer", "imported"), FORBIDDEN)
def test_imports_follow_the_layers(importer: str, imported: str) -> None:
    against = sorted(
        f"{source} imports {target}"
        for source, targets in import_graph().items()
        if source == importer or source.startswith(importer + ".")
        for target in targets
        if target == imported or target.startswith(imported + ".")
    )
    assert against == []


def test_backends_know_only_the_protocol_s_numbers() -> None:
    """Backends report extents in the spec's NBD_STATE_* flags, and nothing else of it."""
    used = {
        target
        for source, targets in import_graph().items()
        if source.startswith("reference_server.backends")
        for target in targets
        if target.startswith("reference_server.protocol")
    }
    assert used <= {"reference_server.protocol.constants"}
