"""Hypothesis fuzzing of the sans-IO core: the settings, seed and strategies shared.

The tests are tests/test_fuzz_core_handshake.py and tests/test_fuzz_core_transmission.py.

No backend is involved: the core turns bytes into validated requests and
results into reply bytes, and the tests run each request against a plain
bytearray through the core's own reply builder (``serve`` in the transmission tests), the way
``reference_server/dispatch.py`` runs it against a backend.

Arbitrary byte streams, and structure-aware streams (valid options and requests
with mutated lengths, magics, flags and payloads, then random byte damage), are
fed in random chunks.  Checked for every example:

* no exception escapes (the core documents none: every client error is an
  option error reply, an NBD error reply, or a Close event);
* the server stays in step with the client's framing: every complete option
  gets exactly one final reply (ACK or error) in order, every complete request
  exactly one final reply with its cookie, and all output parses;
* no state corruption: a shadow copy of the export predicts every successful
  read, and bytes left over after NBD_OPT_GO are exactly the client's.

CI runs a fixed number of derandomized examples (deterministic, well under
20 s).  To fuzz harder, with a seed that is printed and can be replayed:

    NBD_FUZZ_EXAMPLES=20000 NBD_FUZZ_SEED=$RANDOM pytest tests/test_fuzz_core_*.py -s

A failure prints the seed and a ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("NBD_FUZZ_EXAMPLES", "300"))
SEED = os.environ.get("NBD_FUZZ_SEED")
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=SEED is None,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
F = TypeVar("F", bound=Callable[..., Any])


def fuzz(test: F) -> F:
    """The shared settings, plus the seed when one was asked for."""
    wrapped = FUZZ(test)
    return seed(int(SEED))(wrapped) if SEED is not None else wrapped


@pytest.fixture(autouse=True)
def report_fuzz_seed() -> Iterator[None]:
    mode = f"seed={SEED}" if SEED is not None else "derandomized"
    print(f"hypothesis fuzz: {mode} max_examples={EXAMPLES}")
    yield


IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
EXTENDED_MAGIC = 0x6E8A278C
OPTION_LIMIT = 512
MAX_PAYLOAD = 1 << 25
NBD_ERRORS = {1, 5, 12, 22, 28, 75, 95, 108}
SIZE = 256 * 1024

# ------------------------------------------------------------- strategies


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Random damage: (kind, position, value) flips, inserts or deletes a byte."""
    buf = bytearray(data)
    for kind, pos, value in edits:
        if not buf:
            buf.append(value)
            continue
        i = pos % len(buf)
        if kind == 0:
            buf[i] ^= value or 1
        elif kind == 1:
            buf.insert(i, value)
        else:
            del buf[i]
    return bytes(buf)


edits = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4
)
cuts = st.lists(st.integers(0, 1 << 16), max_size=12)
u32 = st.integers(0, 0xFFFFFFFF)
names = st.sampled_from([b"", b"a", b"missing", "é".encode(), b"\xff\xfe", b"x" * 4097])
queries = st.sampled_from(
    [b"base:allocation", b"base:", b"base:x", b"qemu:dirty-bitmap:b", b"nocolon", b""]
)
