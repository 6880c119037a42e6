"""How a broken reference server is made: the real one, with one of its classes replaced.

Each script here runs as ``python3 SCRIPT [MODE] [reference server options...]``
(tests/test_suite_can_fail.py): it imports the reference server of this
checkout, replaces one class the server looks up by name (a Handshake, a
Transmission, a Connection, an ExportInfo) with a subclass that has the bug,
and runs the server's own command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def import_reference_server() -> None:
    """Make this checkout's reference_server importable (a script's path is its own folder)."""
    sys.path.insert(0, str(REPO))


def mode_argument(modes: tuple[str, ...]) -> str | None:
    """The MODE the script was given (its first argument), or None after printing the usage."""
    if len(sys.argv) < 2 or sys.argv[1] not in modes:
        print(f"usage: {sys.argv[0]} {{{','.join(modes)}}} OPTIONS...", file=sys.stderr)
        return None
    return sys.argv[1]


def serve_with(module: object, name: str, replacement: object, argv: list[str]) -> int:
    """Run the reference server's command line with MODULE.NAME (a class or a function)
    replaced by REPLACEMENT."""
    from reference_server import cli

    setattr(module, name, replacement)
    return cli.main(argv)
