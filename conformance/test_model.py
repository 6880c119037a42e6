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

On a failure hypothesis shrinks the sequence and prints the minimal one,
with the command that replays just that sequence (``NBD_MODEL_REPLAY=...``).
Shrinking replays sequences many times, so each example must see the server
as the first did: it gets fresh connections (nothing cached on the server's
side of an old one reaches it) and its own window of the export (nothing an
old connection writes back late lands in it).  The run is derandomised (the
same sequences every run, as CI wants); set NBD_MODEL_RANDOM=1 to explore
new sequences.
"""

from __future__ import annotations

import os
import re

import nbd
import pytest
from hypothesis import HealthCheck, reproduce_failure, settings
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
from conformance.servers.base import DEFAULT_SIZE, ServerConfig
from conformance.spec import MUST, expect_data, expect_zero, spec, unsupported

SECTOR = 512
SECTORS = 64
SIZE = SECTOR * SECTORS  # 32 KiB: small, so that random commands collide often
MAX_CONNECTIONS = 3
#: Windows of SIZE bytes in the export: one per example, reused round-robin.
WINDOWS = DEFAULT_SIZE // SIZE
#: "VERSION:BLOB" of a failing sequence, as the failure message gives it.
REPLAY_ENV = "NBD_MODEL_REPLAY"

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
    """One server for every example of a run (starting a server per example would make
    shrinking a failure take minutes), with fresh connections and a fresh window each."""

    def __init__(self, start_server):
        self.server = start_server(ServerConfig())
        self.window = -1

    def probe(self):
        """A first connection: what the server offers."""
        h = self.server.connect(meta_contexts=[nbd.CONTEXT_BASE_ALLOCATION])
        multi_conn = h.can_multi_conn()
        minimum = h.get_block_size(nbd.SIZE_MINIMUM) or 1
        self.server.close_clients()
        return multi_conn, minimum

    def fresh(self):
        """New connections and the byte offset of the next window, for one example."""
        self.server.close_clients()
        self.window = (self.window + 1) % WINDOWS
        first = self.server.connect(meta_contexts=[nbd.CONTEXT_BASE_ALLOCATION])
        conns = [first]
        if first.can_multi_conn():
            conns += [
                self.server.connect(meta_contexts=[nbd.CONTEXT_BASE_ALLOCATION])
                for _ in range(MAX_CONNECTIONS - 1)
            ]
        return conns, self.window * SIZE


def make_machine(export):
    """The state machine class, bound to the check's export."""

    class ExportMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.conns = []
            self.step = 0

        @initialize()
        def start(self):
            self.conns, self.base = export.fresh()
            first = self.conns[0]
            # A known starting point, durable (hence visible to all): data everywhere, so
            # that every zero or lost write shows.
            self.data = bytearray(pattern(0, SIZE, tag=0xFFFF))
            first.pwrite(self.data, self.base, nbd.CMD_FLAG_FUA if first.can_fua() else 0)
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
            h.pwrite(data, self.base + sector * SECTOR, nbd.CMD_FLAG_FUA if fua else 0)
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
            h.zero(count * SECTOR, self.base + sector * SECTOR, flags)
            self.data[sector * SECTOR : (sector + count) * SECTOR] = bytes(count * SECTOR)
            self.mark(sector, count, conn, fua)

        @precondition(lambda self: self.conns[0].can_trim())
        @rule(conn=connections, sector=sectors, count=lengths, fua=st.booleans())
        def trim(self, conn, sector, count, fua):
            conn = self.conn(conn)
            sector, count = self.clip(sector, count)
            h = self.h(conn)
            fua = fua and h.can_fua()
            h.trim(count * SECTOR, self.base + sector * SECTOR, nbd.CMD_FLAG_FUA if fua else 0)
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
            got = self.h(conn).pread(count * SECTOR, self.base + sector * SECTOR)
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
                offset -= self.base  # the model's offsets are within the window
                if context == nbd.CONTEXT_BASE_ALLOCATION:
                    for length, flags in zip(entries[::2], entries[1::2], strict=True):
                        extents.append((offset, length, flags))
                        offset += length
                return 0

            h.block_status(count * SECTOR, self.base + sector * SECTOR, callback)
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

        def teardown(self):
            export.server.close_clients()

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
def test_random_command_sequences_match_the_model(start_server, request):
    """Writes, zeroes, trims, flushes, reads and block status agree with the model."""
    export = _Export(start_server)
    _multi_conn, minimum = export.probe()
    if SECTOR % minimum:
        unsupported(
            f"the model works in {SECTOR}-byte sectors; the server's minimum block size "
            f"is {minimum}"
        )
    machine = make_machine(export)
    replay = os.environ.get(REPLAY_ENV)
    if replay:
        version, _, blob = replay.partition(":")
        machine = reproduce_failure(version, blob.encode("ascii"))(machine)
    try:
        run_state_machine_as_test(machine, settings=SETTINGS)
    except Exception as err:
        _add_replay_command(err, request)
        raise


_BLOB = re.compile(r"@reproduce_failure\('([^']+)', b'([^']+)'\)")


def _add_replay_command(err: BaseException, request) -> None:
    """Name the one command that replays the minimal failing sequence against this server."""
    notes = "\n".join([str(err), *getattr(err, "__notes__", [])])
    found = _BLOB.search(notes)
    if found is None:
        return
    from conformance.plugin import describe_target, plugin_of

    target = describe_target(plugin_of(request.config).profile)
    err.add_note(
        f"replay just this sequence: {REPLAY_ENV}='{found[1]}:{found[2]}' "
        f"pytest '{request.node.nodeid}' {target}"
    )
