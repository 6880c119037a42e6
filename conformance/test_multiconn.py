"""Several connections at once: the NBD_FLAG_CAN_MULTI_CONN promise, and connection limits.

With MULTI_CONN, a flush (or FUA) acknowledged on one connection makes
every write acknowledged before it visible on every connection: a write on
A, a flush on B, and a read on C must see the data, whichever connection
plays which role and even when C read the old data first (a per-connection
cache would then hand C stale data: the qemu iotest ``nbd-multiconn``
scenario).
"""

from __future__ import annotations

import threading

import nbd
import pytest

from conformance.data import pattern
from conformance.handle import try_connect, wait_all
from conformance.servers.base import ServerConfig
from conformance.spec import MUST, expect, expect_data, expect_equal, spec, unsupported

FLAGS = "Values / Handshake phase / Flag fields / Transmission flags"
MULTI_CONN_RULE = (
    "In particular, if this flag is present, then the effects of `NBD_CMD_FLUSH` "
    "and `NBD_CMD_FLAG_FUA` MUST be visible across all connections when the server "
    "sends its reply to that command to the client."
)
OFFSET = 1 << 20
LENGTH = 65536 + 4096

# Which connection (A, B, C) writes, makes the write durable, and reads.  Connections
# are interchangeable, so these are all the role patterns up to renaming; "fua" means
# the write itself carries NBD_CMD_FLAG_FUA.
ROLES = {
    "write-A.flush-B.read-C": (0, 1, 2),
    "write-A.flush-A.read-B": (0, 0, 1),
    "write-A.flush-B.read-B": (0, 1, 1),
    "write-A.flush-B.read-A": (0, 1, 0),
    "write-fua-A.read-B": (0, None, 1),
}
OPERATIONS = ("write", "write-zeroes", "trim")


def _multi_conn_handles(server, n):
    handles = server.connect(n)
    if not handles[0].can_multi_conn():
        unsupported("the server does not advertise NBD_FLAG_CAN_MULTI_CONN")
    return handles


def _apply(h, operation, fua):
    flags = nbd.CMD_FLAG_FUA if fua else 0
    if operation == "write":
        h.pwrite(pattern(OFFSET, LENGTH, tag=2), OFFSET, flags)
    elif operation == "write-zeroes":
        h.zero(LENGTH, OFFSET, flags)
    else:
        h.trim(LENGTH, OFFSET, flags)


@pytest.mark.writes
@pytest.mark.parametrize("primed", [False, True], ids=["", "reader-read-first"])
@pytest.mark.parametrize("roles", ROLES)
@pytest.mark.parametrize("operation", OPERATIONS)
@spec(FLAGS, MUST, quote=MULTI_CONN_RULE)
def test_flush_or_fua_makes_writes_visible_on_every_connection(server, operation, roles, primed):
    conns = _multi_conn_handles(server, 3)
    w, s, r = ROLES[roles]
    writer, reader = conns[w], conns[r]
    syncer = conns[s] if s is not None else None
    fua = syncer is None
    if fua and not writer.can_fua():
        unsupported("the server does not advertise NBD_FLAG_SEND_FUA")
    if not fua and not writer.can_flush():
        unsupported("the server does not advertise NBD_FLAG_SEND_FLUSH")
    if operation == "write-zeroes" and not writer.can_zero():
        unsupported("the server does not advertise NBD_FLAG_SEND_WRITE_ZEROES")
    if operation == "trim" and not writer.can_trim():
        unsupported("the server does not advertise NBD_FLAG_SEND_TRIM")
    # The old data, made durable (and so, by the same promise, visible everywhere).
    old = pattern(OFFSET, LENGTH, tag=1)
    writer.pwrite(old, OFFSET)
    if writer.can_flush():
        writer.flush()
    else:
        writer.pwrite(old, OFFSET, nbd.CMD_FLAG_FUA)
    if primed:
        expect_data(reader.pread(LENGTH, OFFSET), old, "reader's read of the old data")
    else:
        # The old data must already be visible on a connection that neither wrote it
        # nor reads later: otherwise zeroes from a server that never shares writes
        # would pass for the effect of write-zeroes or trim.
        bystander = next(i for i in range(3) if i not in (w, r))
        expect_data(
            conns[bystander].pread(LENGTH, OFFSET),
            old,
            f"old data, flushed on {'ABC'[w]}, read on {'ABC'[bystander]}",
        )
    _apply(writer, operation, fua)
    if syncer is not None:
        syncer.flush()
    seen = reader.pread(LENGTH, OFFSET)
    if operation == "write":
        expect_data(seen, pattern(OFFSET, LENGTH, tag=2), f"{roles}: data read")
    elif operation == "write-zeroes":
        expect_data(seen, bytes(LENGTH), f"{roles}: data read after write-zeroes")
    else:
        # Trimmed contents are unspecified, but one export shows one content everywhere.
        for name, h in zip("ABC", conns, strict=True):
            expect_data(
                h.pread(LENGTH, OFFSET),
                seen,
                f"{roles}: trimmed range on connection {name} vs the reader's",
            )


@spec(FLAGS, MUST)
def test_multi_conn_server_accepts_a_second_connection(server):
    """Advertising MULTI_CONN invites clients to open several connections: they must get in."""
    first = server.connect()
    if not first.can_multi_conn():
        unsupported("the server does not advertise NBD_FLAG_CAN_MULTI_CONN")
    second = try_connect(server, timeout=3.0)
    expect(
        not isinstance(second, str),
        "second simultaneous connection",
        expected="connected",
        actual=second,
    )


def _check_limit_of_one(server):
    first = server.connect()
    if not first.can_multi_conn():
        return
    second = try_connect(server, timeout=2.0)
    expect(
        not isinstance(second, str),
        "NBD_FLAG_CAN_MULTI_CONN advertised with a connection limit of 1",
        expected="not advertised (or a second connection accepted)",
        actual=f"advertised, and a second connection failed: {second}",
    )


@spec(FLAGS, MUST)
def test_readonly_single_connection_does_not_advertise_multi_conn(start_server):
    """Regression check named after qemu-nbd ``-r`` without ``-e``: limit 1, yet MULTI_CONN."""
    _check_limit_of_one(start_server(ServerConfig(read_only=True, shared=1)))


@spec(FLAGS, MUST)
def test_single_connection_does_not_advertise_multi_conn(start_server):
    _check_limit_of_one(start_server(ServerConfig(shared=1)))


@spec(FLAGS, MUST)
def test_connection_limit_of_two_admits_two(start_server):
    """A server limited to two connections serves two at once (the limit is not off by one)."""
    server = start_server(ServerConfig(shared=2))
    server.connect()
    second = try_connect(server, timeout=3.0)
    expect(
        not isinstance(second, str),
        "second connection under a limit of 2",
        expected="connected",
        actual=second,
    )


WRITERS = 4
STRIPES = 64


def _stripe_length(h):
    minimum = h.get_block_size(nbd.SIZE_MINIMUM) or 1
    return 1536 if 1536 % minimum == 0 else minimum * 2


@pytest.mark.writes
@spec(
    "Values / Transmission phase / Request types",
    MUST,
    quote="The server MUST write the data to disk, and then send the reply message.",
)
def test_concurrent_writers_on_disjoint_ranges_lose_nothing(server):
    """Four connections write interleaved 1.5 KiB stripes at once; every stripe survives.

    Stripes smaller than a 4 KiB page catch servers that read-modify-write
    whole blocks from stale copies.  Each writer checks its stripes on its
    own connection; with MULTI_CONN a fifth connection checks them all.
    """
    handles = server.connect(WRITERS)
    stripe = _stripe_length(handles[0])
    errors: list[BaseException] = []

    def writer(index):
        h = handles[index]
        try:
            offsets = [k * stripe for k in range(index, STRIPES * WRITERS, WRITERS)]
            cookies = [h.aio_pwrite(pattern(o, stripe, tag=index + 1), o) for o in offsets]
            failed = [e for e in wait_all(h, cookies, what=f"writer {index}") if e]
            if failed:
                errors.append(failed[0])
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    expect_equal([t.name for t in threads if t.is_alive()], [], "writer threads still running")
    if errors:
        raise errors[0]
    expected = b"".join(
        pattern(k * stripe, stripe, tag=k % WRITERS + 1) for k in range(STRIPES * WRITERS)
    )
    for index, h in enumerate(handles):
        seen = h.pread(len(expected), 0)
        for k in range(index, STRIPES * WRITERS, WRITERS):
            expect_data(
                seen[k * stripe : (k + 1) * stripe],
                expected[k * stripe : (k + 1) * stripe],
                f"writer {index}'s stripe {k} read on its own connection",
            )
    if handles[0].can_multi_conn() and handles[0].can_flush():
        for h in handles:
            h.flush()
        expect_data(
            server.connect().pread(len(expected), 0),
            expected,
            "all stripes read on a fifth connection",
        )
