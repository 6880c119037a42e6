"""Model-based check: random sequences of commands over several connections vs a model.

A hypothesis state machine drives writes, write-zeroes, trims, flushes,
reads and block-status queries (with and without FUA) over up to three
connections of one export, and keeps an in-memory model of what each
connection is entitled to see:

* a byte written on connection X is visible to X at once, and to every
  connection once a flush (on any connection) or a FUA write acknowledged
  it, when the server advertises NBD_FLAG_CAN_MULTI_CONN (without it, one
  connection is used);
* trimmed bytes are unknown until written again;
* an extent reported NBD_STATE_ZERO must read as zeroes.

On a failure hypothesis shrinks the sequence and prints the minimal one.
The run is derandomised (the same sequences every run, as CI wants); set
NBD_MODEL_RANDOM=1 to explore new sequences.
"""

from __future__ import annotations

import os

import nbd
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from conformance.data import pattern
from conformance.servers.base import ServerConfig
from conformance.spec import MUST, expect_data, expect_zero, spec, unsupported

SECTOR = 512
SECTORS = 64
SIZE = SECTOR * SECTORS  # 32 KiB: small, so that random commands collide often
MAX_CONNECTIONS = 3

#: Owner value of a byte every connection may see.
DURABLE = 0

SETTINGS = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    database=None,
    derandomize=not os.environ.get("NBD_MODEL_RANDOM"),
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

sectors = st.integers(0, SECTORS - 1)
lengths = st.integers(1, 16)
connections = st.integers(0, MAX_CONNECTIONS - 1)


class _Export:
    """One server and its connections, shared by every example of a run (starting a server
    per example would make shrinking a failure take minutes)."""

    def __init__(self, start_server):
        self.start_server = start_server
        self.server = None
        self.conns = []

    def connections(self):
        if self.server is None:
            self.server = self.start_server(ServerConfig(size=SIZE))
            first = self.server.connect(meta_contexts=[nbd.CONTEXT_BASE_ALLOCATION])
            self.conns = [first]
            if first.can_multi_conn():
                self.conns += [
                    self.server.connect(meta_contexts=[nbd.CONTEXT_BASE_ALLOCATION])
                    for _ in range(MAX_CONNECTIONS - 1)
                ]
        return self.conns


def make_machine(export):
    """The state machine class, bound to the check's export."""

    class ExportMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.conns = []
            self.step = 0

        @initialize()
        def start(self):
            self.conns = export.connections()
            first = self.conns[0]
            # A known starting point, durable (hence visible to all): data everywhere, so
            # that every zero or lost write shows.
            self.data = bytearray(pattern(0, SIZE, tag=0xFFFF))
            first.pwrite(self.data, 0, nbd.CMD_FLAG_FUA if first.can_fua() else 0)
            if first.can_flush():
                first.flush()
            self.known = bytearray(b"\1" * SECTORS)
            self.owner = bytearray(SECTORS)  # DURABLE, or 1 + the writing connection

        # ------------------------------------------------------------ helpers

        def conn(self, index):
            return index % len(self.conns)

        def clip(self, sector, count):
            return sector, min(count, SECTORS - sector)

        def mark(self, sector, count, conn, fua, known=True):
            owner = DURABLE if fua else 1 + conn
            for s in range(sector, sector + count):
                self.owner[s] = owner
                self.known[s] = known

        def visible(self, s, conn):
            return self.known[s] and self.owner[s] in (DURABLE, 1 + conn)

        def h(self, conn):
            return self.conns[conn]

        # -------------------------------------------------------------- rules

        @rule(conn=connections, sector=sectors, count=lengths, fua=st.booleans())
        def write(self, conn, sector, count, fua):
            conn = self.conn(conn)
            sector, count = self.clip(sector, count)
            h = self.h(conn)
            fua = fua and h.can_fua()
            self.step += 1
            data = pattern(sector * SECTOR, count * SECTOR, tag=self.step)
            h.pwrite(data, sector * SECTOR, nbd.CMD_FLAG_FUA if fua else 0)
            self.data[sector * SECTOR : (sector + count) * SECTOR] = data
            self.mark(sector, count, conn, fua)

        @precondition(lambda self: self.conns[0].can_zero())
        @rule(
            conn=connections,
            sector=sectors,
            count=lengths,
            fua=st.booleans(),
            no_hole=st.booleans(),
        )
        def write_zeroes(self, conn, sector, count, fua, no_hole):
            conn = self.conn(conn)
            sector, count = self.clip(sector, count)
            h = self.h(conn)
            fua = fua and h.can_fua()
            flags = (nbd.CMD_FLAG_FUA if fua else 0) | (nbd.CMD_FLAG_NO_HOLE if no_hole else 0)
            h.zero(count * SECTOR, sector * SECTOR, flags)
            self.data[sector * SECTOR : (sector + count) * SECTOR] = bytes(count * SECTOR)
            self.mark(sector, count, conn, fua)

        @precondition(lambda self: self.conns[0].can_trim())
        @rule(conn=connections, sector=sectors, count=lengths, fua=st.booleans())
        def trim(self, conn, sector, count, fua):
            conn = self.conn(conn)
            sector, count = self.clip(sector, count)
            h = self.h(conn)
            fua = fua and h.can_fua()
            h.trim(count * SECTOR, sector * SECTOR, nbd.CMD_FLAG_FUA if fua else 0)
            self.mark(sector, count, conn, fua, known=False)

        @precondition(lambda self: self.conns[0].can_flush())
        @rule(conn=connections)
        def flush(self, conn):
            self.h(self.conn(conn)).flush()
            # Every write acknowledged before the flush is now visible everywhere.
            for s in range(SECTORS):
                self.owner[s] = DURABLE

        @rule(conn=connections, sector=sectors, count=lengths)
        def read(self, conn, sector, count):
            conn = self.conn(conn)
            sector, count = self.clip(sector, count)
            got = self.h(conn).pread(count * SECTOR, sector * SECTOR)
            for s in range(sector, sector + count):
                if self.visible(s, conn):
                    at = (s - sector) * SECTOR
                    expect_data(
                        got[at : at + SECTOR],
                        self.data[s * SECTOR : (s + 1) * SECTOR],
                        f"connection {conn}: sector {s} (byte {s * SECTOR})",
                    )

        @rule(conn=connections)
        def read_everything(self, conn):
            self.read(conn, 0, SECTORS)

        @rule(conn=connections, sector=sectors, count=lengths)
        def block_status(self, conn, sector, count):
            conn = self.conn(conn)
            h = self.h(conn)
            if not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
                return
            sector, count = self.clip(sector, count)
            extents = []

            def callback(context, offset, entries, err):
                if context == nbd.CONTEXT_BASE_ALLOCATION:
                    for length, flags in zip(entries[::2], entries[1::2], strict=True):
                        extents.append((offset, length, flags))
                        offset += length
                return 0

            h.block_status(count * SECTOR, sector * SECTOR, callback)
            for offset, length, flags in extents:
                if not flags & nbd.STATE_ZERO:
                    continue
                for s in range(offset // SECTOR, min(SECTORS, -(-(offset + length) // SECTOR))):
                    lo = max(offset, s * SECTOR)
                    hi = min(offset + length, (s + 1) * SECTOR)
                    if self.visible(s, conn) and lo < hi:
                        expect_zero(
                            self.data[lo:hi],
                            f"connection {conn}: bytes [{lo}, {hi}) "
                            f"reported NBD_STATE_ZERO hold data",
                        )

        @invariant()
        def connections_alive(self):
            for index, h in enumerate(self.conns):
                if not h.aio_is_ready():
                    raise AssertionError(f"connection {index}: {h.connection_state()}")

    return ExportMachine


@pytest.mark.writes
@spec(
    "Values / Handshake phase / Flag fields / Transmission flags",
    MUST,
    quote="In particular, if this flag is present, then the effects of `NBD_CMD_FLUSH` and "
    "`NBD_CMD_FLAG_FUA` MUST be visible across all connections when the server sends its "
    "reply to that command to the client.",
)
def test_random_command_sequences_match_the_model(start_server):
    """Writes, zeroes, trims, flushes, reads and block status agree with the model."""
    export = _Export(start_server)
    minimum = export.connections()[0].get_block_size(nbd.SIZE_MINIMUM) or 1
    if SECTOR % minimum:
        unsupported(
            f"the model works in {SECTOR}-byte sectors; the server's minimum block size "
            f"is {minimum}"
        )
    run_state_machine_as_test(make_machine(export), settings=SETTINGS)
