"""``nbd-conformance``: the conformance suite as a command.

Every argument is passed to pytest, which runs the suite's checks with the
suite's plugin, e.g.::

    nbd-conformance --nbd-server=qemu-nbd -n auto --report=report.json
    nbd-conformance --uri 'nbd+unix:///disk?socket=/run/nbd.sock'
    nbd-conformance --server-cmd 'myserver -k {socket} --size {size} {read_only:-r}'
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    return int(pytest.main([str(SUITE), "-p", "no:cacheprovider", *args]))


if __name__ == "__main__":
    sys.exit(main())
