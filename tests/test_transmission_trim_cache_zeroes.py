"""TRIM, CACHE and WRITE_ZEROES (with NBD_CMD_FLAG_FAST_ZERO).

Unit tests of protocol/transmission.py, driven by tests/transmission_driver.py.
"""

from __future__ import annotations

import errno

import pytest

from reference_server.backends.memory import MemoryBackend
from reference_server.protocol.constants import Command, Errno
from reference_server.protocol.export import ExportInfo
from tests.transmission_driver import (
    DF,
    FAST_ZERO,
    FUA,
    NO_HOLE,
    PATTERN,
    SIZE,
    Conn,
    conn,
    negotiate,
)

# -------------------------------------------------------------------- TRIM


def test_trim_succeeds_and_is_fua_capable() -> None:
    c = conn()
    c.write(0, PATTERN)
    assert c.error_of(Command.TRIM, 0, 4096) == 0
    assert c.error_of(Command.TRIM, 0, 4096, flags=FUA) == 0


def test_trim_past_the_end_is_einval() -> None:
    c = conn()
    assert c.error_of(Command.TRIM, SIZE - 4096, 8192) == Errno.EINVAL


def test_trim_on_read_only_is_eperm() -> None:
    c = conn(ExportInfo("", SIZE, read_only=True))
    assert c.error_of(Command.TRIM, 0, 4096) == Errno.EPERM


def test_trim_not_advertised_is_einval() -> None:
    c = conn(ExportInfo("", SIZE, can_trim=False))
    assert c.error_of(Command.TRIM, 0, 4096) == Errno.EINVAL


# ------------------------------------------------------------------- CACHE


def test_cache_succeeds_and_out_of_range_fails() -> None:
    c = conn()
    assert c.error_of(Command.CACHE, 0, 65536) == 0
    assert c.error_of(Command.CACHE, 0, 65536, flags=FUA) == 0
    assert c.error_of(Command.CACHE, SIZE, 1) == Errno.EINVAL


def test_cache_with_inapplicable_flag_is_einval() -> None:
    # "if it advertised the command, the server MUST reject any command flags
    # it does not recognize".
    c = conn(structured=True)
    assert c.error_of(Command.CACHE, 0, 512, flags=DF) == Errno.EINVAL


# ----------------------------------------------------------- WRITE_ZEROES


@pytest.mark.parametrize("flags", [0, NO_HOLE, FAST_ZERO, NO_HOLE | FAST_ZERO | FUA])
def test_write_zeroes_reads_back_zero(flags: int) -> None:
    c = conn()
    c.write(0, PATTERN * 20)
    assert c.error_of(Command.WRITE_ZEROES, 100, 50000, flags=flags) == 0
    expected = (PATTERN * 20)[:100] + bytes(50000) + (PATTERN * 20)[50100:]
    assert c.read(0, len(PATTERN) * 20) == expected


def test_write_zeroes_past_the_end_is_enospc() -> None:
    c = conn()
    assert c.error_of(Command.WRITE_ZEROES, SIZE - 1, 2) == Errno.ENOSPC


def test_write_zeroes_on_read_only_is_eperm() -> None:
    c = conn(ExportInfo("", SIZE, read_only=True))
    assert c.error_of(Command.WRITE_ZEROES, 0, 4096) == Errno.EPERM
    assert c.error_of(Command.WRITE_ZEROES, 0, 4096, flags=NO_HOLE) == Errno.EPERM


def test_fast_zero_without_advertising_it_is_einval() -> None:
    # "If the server did not advertise NBD_FLAG_SEND_FAST_ZERO ... SHOULD fail
    # with NBD_EINVAL if the NBD_CMD_FLAG_FAST_ZERO flag was set."
    c = conn(ExportInfo("", SIZE, can_fast_zero=False))
    assert c.error_of(Command.WRITE_ZEROES, 0, 4096, flags=FAST_ZERO) == Errno.EINVAL
    assert c.error_of(Command.WRITE_ZEROES, 0, 4096) == 0


def test_write_zeroes_not_advertised_is_einval() -> None:
    c = conn(ExportInfo("", SIZE, can_zero=False))
    assert c.error_of(Command.WRITE_ZEROES, 0, 4096) == Errno.EINVAL


class _SlowZeroBackend(MemoryBackend):
    """A backend whose zeroing is never fast, to check the ENOTSUP mapping."""

    def zero(self, length: int, offset: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        if fast:
            raise OSError(errno.ENOTSUP, "not fast")
        super().zero(length, offset, may_trim=may_trim, fast=fast, fua=fua)


def test_fast_zero_that_would_be_slow_is_enotsup_and_changes_nothing() -> None:
    export = ExportInfo("", SIZE)
    c = Conn(negotiate(export, structured=True), _SlowZeroBackend(SIZE))
    c.write(0, PATTERN)
    assert c.error_of(Command.WRITE_ZEROES, 0, 4096, flags=FAST_ZERO) == Errno.ENOTSUP
    assert c.read(0, len(PATTERN)) == PATTERN
    assert c.error_of(Command.WRITE_ZEROES, 0, 4096) == 0


def test_cache_not_advertised_is_einval() -> None:
    c = conn(ExportInfo("", SIZE, can_cache=False))
    assert c.error_of(Command.CACHE, 0, 4096) == Errno.EINVAL
