"""Error values: unknown, inapplicable and misaligned requests; backend errno mapping.

Unit tests of protocol/transmission.py, driven by tests/transmission_driver.py.
"""

from __future__ import annotations

import errno

import pytest

from reference_server.backends.base import Extent
from reference_server.backends.memory import MemoryBackend
from reference_server.protocol.constants import Command, CommandFlag, Errno, StateFlag
from reference_server.protocol.export import BlockSizes, ExportInfo
from tests.transmission_driver import (
    DF,
    FAST_ZERO,
    NO_HOLE,
    PAYLOAD_LEN,
    REQ_ONE,
    SIZE,
    Conn,
    conn,
    negotiate,
)

# ---------------------------------------------------------- error values


@pytest.mark.parametrize("command", [Command.RESIZE, 9, 0x1234, 0xFFFF])
@pytest.mark.parametrize("kw", [{}, {"structured": True}, {"extended": True}])
def test_unknown_command_is_einval(command: int, kw: dict[str, bool]) -> None:
    c = conn(None, **kw)
    assert c.error_of(command, 0, 512) == Errno.EINVAL
    assert c.closed is None


@pytest.mark.parametrize("bit", [6, 12, 15])
@pytest.mark.parametrize(
    "command",
    [Command.READ, Command.FLUSH, Command.WRITE_ZEROES],
    ids=["READ", "FLUSH", "WRITE_ZEROES"],
)
def test_unknown_command_flag_is_einval(bit: int, command: Command) -> None:
    # "Error values": "SHOULD return NBD_EINVAL if it receives an unknown command flag".
    c = conn(structured=True)
    assert c.error_of(command, 0, 512, flags=1 << bit) == Errno.EINVAL


def test_unknown_command_flag_on_write_is_einval() -> None:
    c = conn()
    assert c.write(0, b"abcd", 1 << 7) == Errno.EINVAL
    assert c.read(0, 4) == bytes(4)


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (Command.READ, NO_HOLE),
        (Command.READ, REQ_ONE),
        (Command.READ, FAST_ZERO),
        (Command.READ, PAYLOAD_LEN),
        (Command.WRITE_ZEROES, DF),
        (Command.WRITE_ZEROES, REQ_ONE),
        (Command.TRIM, NO_HOLE),
        (Command.TRIM, FAST_ZERO),
        (Command.FLUSH, DF),
        (Command.BLOCK_STATUS, DF),
        (Command.BLOCK_STATUS, NO_HOLE),
    ],
)
def test_inapplicable_flag_is_einval(command: Command, flag: CommandFlag) -> None:
    # "It also SHOULD return NBD_EINVAL if it receives a request with a flag not
    # explicitly documented as applicable to the given request."
    c = conn(structured=True, meta=True)
    assert c.error_of(command, 0, 512, flags=flag) == Errno.EINVAL


@pytest.mark.parametrize("flag", [NO_HOLE, DF, REQ_ONE, FAST_ZERO])
def test_inapplicable_flag_on_write_is_einval(flag: CommandFlag) -> None:
    c = conn(structured=True)
    assert c.write(0, b"abcd", flag) == Errno.EINVAL
    assert c.read(0, 4) == bytes(4)


def test_df_without_structured_replies_is_einval() -> None:
    # SEND_DF is clear without structured replies: DF MUST NOT be used then.
    c = conn()
    assert c.error_of(Command.READ, 0, 512, flags=DF) == Errno.EINVAL


ALIGNED = ExportInfo("", SIZE, block_sizes=BlockSizes(512, 4096, 1 << 20))


@pytest.mark.parametrize(
    ("command", "offset", "length"),
    [
        (Command.READ, 1, 512),
        (Command.READ, 0, 100),
        (Command.TRIM, 256, 512),
        (Command.WRITE_ZEROES, 512, 1000),
        (Command.CACHE, 100, 512),
    ],
)
def test_misaligned_request_is_einval(command: Command, offset: int, length: int) -> None:
    c = conn(ALIGNED, structured=True)
    assert c.error_of(command, offset, length) == Errno.EINVAL


def test_misaligned_write_is_einval_and_aligned_one_works() -> None:
    c = conn(ALIGNED)
    assert c.write(100, bytes(512)) == Errno.EINVAL
    assert c.write(512, b"y" * 100) == Errno.EINVAL
    assert c.write(512, b"y" * 512) == 0
    assert c.read(512, 512) == b"y" * 512


# ----------------------------------------------------- backend error mapping


class _FailingBackend(MemoryBackend):
    def __init__(self, size: int, err: int) -> None:
        super().__init__(size)
        self.err = err

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
        raise OSError(self.err, "injected")

    def pread(self, length: int, offset: int) -> bytes:
        raise OSError(self.err, "injected")

    def pread_into(self, view: memoryview, offset: int, *, fresh: bool = False) -> None:
        raise OSError(self.err, "injected")


@pytest.mark.parametrize(
    ("err", "nbd"),
    [
        (errno.EDQUOT, Errno.ENOSPC),
        (errno.EFBIG, Errno.ENOSPC),
        (errno.ENOSPC, Errno.ENOSPC),
        (errno.EROFS, Errno.EPERM),
        (errno.EIO, Errno.EIO),
        (errno.ENOENT, Errno.EIO),
    ],
)
def test_backend_errno_is_mapped_to_an_nbd_error(err: int, nbd: Errno) -> None:
    c = Conn(negotiate(ExportInfo("", SIZE)), _FailingBackend(SIZE, err))
    assert c.write(0, b"abcd") == nbd


def test_backend_read_error_with_structured_replies_is_an_error_chunk() -> None:
    c = Conn(negotiate(ExportInfo("", SIZE), structured=True), _FailingBackend(SIZE, errno.EIO))
    c.backend.extents = lambda length, offset: [Extent(length, StateFlag(0))]  # type: ignore[method-assign]
    [reply] = c.call(Command.READ, 0, 512)
    assert reply.error_chunk()[0] == Errno.EIO
