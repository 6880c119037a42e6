#!/usr/bin/env python3
"""Capture the protocol exchanges the documentation shows, from the real server.

Every exchange in the protocol tour is produced here, never typed by hand:
each scenario starts the reference server with ``--trace`` on a Unix socket
in a temporary directory, drives it with a real client (nbdinfo, nbdsh,
qemu-io), stops it, and writes two files:

``NAME.session``
    the shell commands, as a reader would type them, and what they printed;
``NAME.trace``
    the server's annotated wire log (``--trace``), one line per message.

``raw-*.hex`` files are annotated hex dumps of real bytes: a raw socket
session with the server whose bytes are cut into the fields the
specification lays out ("Protocol phases" and "Values").

Normalisation: the temporary directory becomes ``$DIR``; qemu's cookies,
derived from a memory address, become ``<c1>``, ``<c2>``... in order of
first use; and when several connections say goodbye at the end
(``NBD_CMD_DISC`` and ``NBD_OPT_ABORT`` get no reply the client waits for),
the order in which the server happens to read them is not the clients'
order, so those last lines are sorted by connection.  Everything else is
what the programs printed.

Usage::

    python3 docs/traces/capture.py            # rewrite docs/traces/*
    python3 docs/traces/capture.py --check    # exit 1, with a diff, on drift
    python3 docs/traces/capture.py --only tls --out /tmp/t

The docs' Sphinx extension (docs/_ext/nbddocs/) runs ``--check`` at build
time, so a change of the server's behaviour that the docs do not reflect
fails ``tox -e docs``.

This file is the command line and the comparison; the work is in
``capturing/``: ``scenarios.py`` (what each exchange is), ``scenario_runs.py``
(running one and normalising it), ``annotation.py`` and ``raw_session.py``
(the annotated hex dumps).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:  # run as a script: the server harness lives in conformance/
    sys.path.insert(1, str(REPO))

from capturing import CaptureError  # noqa: E402
from capturing.raw_session import raw_session  # noqa: E402
from capturing.scenario_runs import run_scenario  # noqa: E402
from capturing.scenarios import SCENARIOS  # noqa: E402

SUFFIXES = (".session", ".trace", ".hex")


# -------------------------------------------------------------- the driver


def capture(out: Path, only: set[str] | None = None) -> list[str]:
    """Write every scenario's files into OUT; return their names."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    jobs: list[tuple[str, Callable[[Path], dict[str, str]]]] = [
        (s.name, functools.partial(run_scenario, s)) for s in SCENARIOS
    ]
    jobs.append(("raw", raw_session))
    for name, job in jobs:
        if only and name not in only:
            continue
        with _workdir() as workdir:
            for file_name, text in job(workdir).items():
                (out / file_name).write_text(text)
                written.append(file_name)
    return written


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    """A scratch directory under /tmp: a Unix socket path must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="nbd-docs-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def checked_in() -> Iterator[Path]:
    return (p for p in sorted(HERE.iterdir()) if p.suffix in SUFFIXES)


def check() -> int:
    """Regenerate into a temporary directory and compare with the checked-in files."""
    with _workdir() as fresh:
        capture(fresh)
        new = {p.name: p.read_text() for p in fresh.iterdir()}
    old = {p.name: p.read_text() for p in checked_in()}
    problems: list[str] = []
    for name in sorted(old.keys() | new.keys()):
        if name not in new:
            problems.append(f"docs/traces/{name}: checked in, but no scenario produces it\n")
        elif name not in old:
            problems.append(f"docs/traces/{name}: produced, but not checked in\n")
        elif old[name] != new[name]:
            problems.extend(
                difflib.unified_diff(
                    old[name].splitlines(keepends=True),
                    new[name].splitlines(keepends=True),
                    f"docs/traces/{name} (checked in)",
                    f"docs/traces/{name} (captured now)",
                )
            )
    if problems:
        sys.stdout.write("".join(problems))
        print(
            "\nThe reference server's behaviour differs from what the docs show. Update the "
            "docs: python3 docs/traces/capture.py, then review the prose around the "
            "changed traces.",
        )
        return 1
    print(f"docs/traces: {len(old)} files match the reference server")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--out", type=Path, default=HERE, help="where to write (default: here)")
    parser.add_argument("--only", action="append", help="capture only this scenario")
    args = parser.parse_args(argv)
    for tool in ("nbdinfo", "nbdsh", "qemu-io", "openssl"):
        if not shutil.which(tool, path="/usr/bin:/bin"):
            print(f"capture.py: {tool} is not installed (./bootstrap installs it)", file=sys.stderr)
            return 2
    try:
        if args.check:
            return check()
        if args.out == HERE and not args.only:
            for old in checked_in():
                old.unlink()
        for name in capture(args.out, set(args.only) if args.only else None):
            print(f"wrote {args.out / name}")
    except CaptureError as exc:
        print(f"capture.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
