"""``nbd-conformance``: the conformance suite as a command.

Every argument is passed to pytest, which runs the suite's checks with the
suite's plugin, e.g.::

    nbd-conformance --nbd-server=qemu-nbd -n auto --report=report.json
    nbd-conformance --uri 'nbd+unix:///disk?socket=/run/nbd.sock'
    nbd-conformance --server-cmd 'myserver -k {socket} --size {size} {read_only:-r}'

``nbd-conformance matrix ...`` runs it against several servers (or merges
reports) into one HTML page: see :mod:`conformance.matrix.cli`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parent


USAGE = """\
usage: nbd-conformance [--nbd-server=PROFILE | --server-cmd=TEMPLATE | --uri=URI]
                       [--allow-writes] [--allow-disruptive] [--nbd-strict]
                       [--report=FILE.json]
                       [-n auto] [any pytest option]
       nbd-conformance matrix [--help] [REPORT.json ...]

Validate an NBD server against the NBD protocol specification.  'matrix' runs
several servers (or merges reports) into one HTML page: see 'matrix --help'.

  --nbd-server=PROFILE   reference (default), qemu-nbd, nbdkit or nbd-server
  --server-cmd=TEMPLATE  start another server per check; placeholders {socket}
                         {size} {export} {description} {shared} {tls_dir}
                         {read_only:WORD} {tls:WORD}
  --uri=URI              a running server (nbd://, nbds://, nbd+unix://, nbds+unix://)
  --allow-writes         with --uri, let checks write (destroys the export's data)
  --allow-disruptive     with --uri, run checks that may crash or wedge the server
  --nbd-strict           SHOULD-level failures fail instead of warning
  --report=FILE.json     every check's verdict as JSON
  -n auto                run checks in parallel (pytest-xdist)

'pytest --help' lists every other option; they all work here too.
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["matrix"]:
        from conformance.matrix.cli import main as matrix_main

        return matrix_main(args[1:])
    if "-h" in args or "--help" in args:
        from conformance.requirements.coverage import coverage_lines

        sys.stdout.write(USAGE + "\n" + "\n".join(coverage_lines()) + "\n")
        return 0
    return int(pytest.main([str(SUITE), "-p", "no:cacheprovider", *args]))


if __name__ == "__main__":
    sys.exit(main())
