"""The suite's checks and their ``@spec(section, level, quote)`` tags, read from the source.

The ledger names the checks that test each requirement by function name;
this module lists the checks by static analysis (``ast``), so that neither
the ledger's tests nor the docs build import the suite, pytest or libnbd.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

__all__ = ["SUITE", "Check", "suite_checks"]

#: The directory of the conformance checks (``conformance/test_*.py``).
SUITE = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Check:
    """One ``@spec``-tagged check: its ID (the function name) and its citation."""

    name: str
    file: str
    line: int
    section: str
    level: str
    quote: str | None


def _string(node: ast.expr | None, names: dict[str, ast.expr], depth: int = 0) -> str | None:
    """The value of a string expression made of literals, module constants and ``+``."""
    if node is None or depth > 20:
        return None
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else None
    if isinstance(node, ast.Name) and node.id in names:
        return _string(names[node.id], names, depth + 1)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string(node.left, names, depth + 1), _string(node.right, names, depth + 1)
        return left + right if left is not None and right is not None else None
    return None


def _level(node: ast.expr | None) -> str:
    """MUST, SHOULD or MAY from ``MUST``, ``Level.MUST`` or a literal; MUST by default."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Constant):
        return str(node.value)
    return "MUST"


def _module_constants(tree: ast.Module) -> dict[str, ast.expr]:
    names: dict[str, ast.expr] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target = statement.targets[0]
            if isinstance(target, ast.Name):
                names[target.id] = statement.value
        elif (
            isinstance(statement, ast.AnnAssign)
            and statement.value is not None
            and isinstance(statement.target, ast.Name)
        ):
            names[statement.target.id] = statement.value
    return names


def _spec_call(decorator: ast.expr) -> ast.Call | None:
    if not isinstance(decorator, ast.Call):
        return None
    func = decorator.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    return decorator if name == "spec" else None


def suite_checks(directory: Path = SUITE) -> tuple[list[Check], list[str]]:
    """Every ``@spec(...)``-tagged check in DIRECTORY/test_*.py, and what could not be read."""
    checks: list[Check] = []
    problems: list[str] = []
    for path in sorted(directory.glob("test_*.py")):
        relative = f"{directory.name}/{path.name}"
        try:
            tree = ast.parse(path.read_text(), relative)
        except SyntaxError as exc:
            problems.append(f"{relative}: cannot parse: {exc}")
            continue
        names = _module_constants(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for decorator in node.decorator_list:
                call = _spec_call(decorator)
                if call is None:
                    continue
                args: dict[str, ast.expr | None] = dict(
                    zip(("section", "level", "quote"), call.args, strict=False)
                )
                args.update({k.arg: k.value for k in call.keywords if k.arg})
                section = _string(args.get("section"), names)
                if section is None:
                    problems.append(
                        f"{relative}:{node.lineno}: {node.name}: cannot read the section of its "
                        "@spec statically (use a string literal or a module-level constant)"
                    )
                    continue
                checks.append(
                    Check(
                        name=node.name,
                        file=relative,
                        line=node.lineno,
                        section=section,
                        level=_level(args.get("level")),
                        quote=_string(args.get("quote"), names) or None,
                    )
                )
    return checks, problems
