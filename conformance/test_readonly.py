"""A read-only export refuses every write command and keeps its data.

libnbd refuses to send writes to a read-only export; strict mode is relaxed
so that the request reaches the server, which must reject it.  A write to a
read-only export is still a write: a server that ignores its own read-only
flag would change the data, so these checks need consent (``writes``) like
any other writer.
"""

from __future__ import annotations

import errno

import nbd
import pytest

from conformance.spec import MUST, SHOULD, expect_data, expect_nbd_error, spec

FLAGS = "Values / Handshake phase / Flag fields / Transmission flags"
ERRORS = "Values / Transmission phase / Error values"

# Each write command, as a callable on (handle, offset, length).
WRITES = {
    "write": lambda h, offset, length: h.pwrite(b"\xa5" * length, offset),
    "write-fua": lambda h, offset, length: h.pwrite(b"\xa5" * length, offset, nbd.CMD_FLAG_FUA),
    "trim": lambda h, offset, length: h.trim(length, offset),
    "write-zeroes": lambda h, offset, length: h.zero(length, offset),
}


@pytest.mark.writes
@pytest.mark.parametrize("command", WRITES)
@spec(
    FLAGS,
    MUST,
    quote="If this flag is set, the server MUST error subsequent write operations to the export.",
)
def test_write_commands_fail_and_change_nothing(ro_server, command):
    h = ro_server.connect(strict=0)
    before = h.pread(65536, 0)
    expect_nbd_error(
        lambda: WRITES[command](h, 4096, 8192), range(1, 256), f"{command} on a read-only export"
    )
    expect_data(h.pread(65536, 0), before, f"data after a refused {command}")


@pytest.mark.writes
@pytest.mark.parametrize("command", ["write", "trim"])
@spec(
    ERRORS,
    SHOULD,
    quote="Finally, it SHOULD return `NBD_EPERM` if it receives a write or trim "
    "request on a read-only export.",
)
def test_write_and_trim_get_eperm(ro_server, command):
    h = ro_server.connect(strict=0)
    expect_nbd_error(
        lambda: WRITES[command](h, 0, 4096), errno.EPERM, f"{command} on a read-only export"
    )


@pytest.mark.writes
@spec(
    "Values / Transmission phase / Request types",
    SHOULD,
    quote="It SHOULD return `NBD_EPERM` "
    "if it receives a write zeroes request on a read-only export.",
)
def test_write_zeroes_gets_eperm(ro_server):
    h = ro_server.connect(strict=0)
    expect_nbd_error(lambda: h.zero(4096, 0), errno.EPERM, "write-zeroes on a read-only export")


@spec(FLAGS, MUST)
def test_reads_work_on_a_read_only_export(ro_server):
    """Read-only means no writes, not no service: reads of the whole range succeed."""
    h = ro_server.connect()
    size = h.get_size()
    expect_data(h.pread(4096, size - 4096), h.pread(4096, size - 4096), "repeated read")
    expect_data(h.pread(512, 0), h.pread(512, 0), "repeated read of the first sector")
