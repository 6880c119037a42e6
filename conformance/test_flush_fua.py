"""NBD_CMD_FLUSH and NBD_CMD_FLAG_FUA on one connection (across connections: test_multiconn)."""

from __future__ import annotations

import nbd
import pytest

from conformance.data import pattern
from conformance.spec import MUST, expect_data, spec, unsupported

COMMAND_FLAGS = "Values / Transmission phase / Flag fields / Command flags"
FUA_RULE = (
    "This flag is valid for all commands, provided `NBD_FLAG_SEND_FUA` has been "
    "negotiated, in which case the server MUST accept all commands with this bit set "
    "(even by ignoring the bit)."
)


def _needs_fua(h):
    if not h.can_fua():
        unsupported("the server does not advertise NBD_FLAG_SEND_FUA")


@pytest.mark.writes
@spec("Values / Transmission phase / Request types", MUST)
def test_flush_succeeds(server):
    """Flush is exposed by NBD_FLAG_SEND_FLUSH: the server answers it, with or without writes."""
    h = server.connect()
    if not h.can_flush():
        unsupported("the server does not advertise NBD_FLAG_SEND_FLUSH")
    h.flush()
    h.pwrite(pattern(0, 4096), 0)
    h.flush()
    expect_data(h.pread(4096, 0), pattern(0, 4096), "data after flush")


@pytest.mark.writes
@spec(COMMAND_FLAGS, MUST, quote=FUA_RULE)
def test_fua_write_round_trips(server):
    h = server.connect()
    _needs_fua(h)
    data = pattern(8192, 8192, tag=2)
    h.pwrite(data, 8192, nbd.CMD_FLAG_FUA)
    expect_data(h.pread(8192, 8192), data, "data written with FUA")


@pytest.mark.writes
@pytest.mark.parametrize("command", ["trim", "zero"])
@spec(COMMAND_FLAGS, MUST, quote=FUA_RULE)
def test_fua_accepted_on_trim_and_write_zeroes(server, command):
    h = server.connect()
    _needs_fua(h)
    if command == "trim" and not h.can_trim():
        unsupported("the server does not advertise NBD_FLAG_SEND_TRIM")
    if command == "zero" and not h.can_zero():
        unsupported("the server does not advertise NBD_FLAG_SEND_WRITE_ZEROES")
    h.pwrite(pattern(0, 65536, tag=3), 0)
    getattr(h, command)(65536, 0, nbd.CMD_FLAG_FUA)
    if command == "zero":
        expect_data(h.pread(65536, 0), bytes(65536), "data after write-zeroes with FUA")


@pytest.mark.parametrize("command", ["read", "flush", "cache"])
@spec(COMMAND_FLAGS, MUST, quote=FUA_RULE)
def test_fua_accepted_on_commands_that_do_not_write(server, command):
    """FUA on READ, FLUSH and CACHE: clients are known to send it; the server must accept."""
    h = server.connect(strict=0)
    _needs_fua(h)
    if command == "flush" and not h.can_flush():
        unsupported("the server does not advertise NBD_FLAG_SEND_FLUSH")
    if command == "cache" and not h.can_cache():
        unsupported("the server does not advertise NBD_FLAG_SEND_CACHE")
    if command == "read":
        h.pread(4096, 0, nbd.CMD_FLAG_FUA)
    elif command == "flush":
        h.flush(nbd.CMD_FLAG_FUA)
    else:
        h.cache(4096, 0, nbd.CMD_FLAG_FUA)
