"""Every number the NBD protocol puts on the wire, named once.

Values and names follow ``proto.md`` ("Values" and the message layouts under
"Protocol phases") and, for 64-bit headers, the EXTENDED_HEADERS extension
(``proto-extension-ext-header.md``).  Enums are tolerant of unknown values so
that a number read off the wire can always be turned into something printable.
"""

from __future__ import annotations

import enum
from typing import Self


class _TolerantIntEnum(enum.IntEnum):
    """An IntEnum that maps an unknown value to a pseudo-member instead of raising."""

    @classmethod
    def _missing_(cls, value: object) -> Self | None:
        if not isinstance(value, int):
            return None
        member = int.__new__(cls, value)
        member._name_ = f"{cls.__name__}({value:#x})"
        member._value_ = value
        return member


# "Handshake / Newstyle negotiation" and "Protocol phases / Transmission".
NBDMAGIC = 0x4E42444D41474943  # 'NBDMAGIC'
IHAVEOPT = 0x49484156454F5054  # 'IHAVEOPT'
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

# Limits the spec names.  "Conventions": strings are at most 4096 bytes.
MAX_STRING_LENGTH = 4096
# "Size constraints": payloads up to 2^25 are never a denial of service.
DEFAULT_MAX_PAYLOAD = 1 << 25
# "Size constraints": a minimum block size MUST NOT be larger than 2^16.
MAX_MINIMUM_BLOCK_SIZE = 1 << 16
# "Request types / NBD_CMD_READ": DF must be honoured up to 64 KiB.
DF_GUARANTEED_LENGTH = 65536
# "Structured reply types / NBD_REPLY_TYPE_BLOCK_STATUS": at most 2^20 extents.
MAX_EXTENTS_PER_CHUNK = 1 << 20


class HandshakeFlag(enum.IntFlag):
    """Values / Handshake phase / Flag fields / Handshake flags (16 bits)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Values / Handshake phase / Flag fields / Client flags (32 bits)."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """Values / Handshake phase / Flag fields / Transmission flags (16 bits)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Option(_TolerantIntEnum):
    """Values / Handshake phase / Option types."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Reply(_TolerantIntEnum):
    """Values / Handshake phase / Option reply types (errors have bit 31 set)."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9
    ERR_EXT_HEADER_REQD = (1 << 31) + 10

    @property
    def is_error(self) -> bool:
        return bool(self & (1 << 31))


class Info(_TolerantIntEnum):
    """Values / Handshake phase / Option reply types / NBD_REP_INFO types."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(_TolerantIntEnum):
    """Values / Transmission phase / Request types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(enum.IntFlag):
    """Values / Transmission phase / Flag fields / Command flags."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(enum.IntFlag):
    """Values / Transmission phase / Flag fields / Structured reply flags."""

    DONE = 1 << 0


class ChunkType(_TolerantIntEnum):
    """Values / Transmission phase / Structured reply types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class Errno(_TolerantIntEnum):
    """Values / Transmission phase / Error values."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class StateFlag(enum.IntFlag):
    """Metadata querying / The base: namespace / base:allocation flags."""

    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"

# Which command flags each command accepts ("Command flags": "Clients MUST NOT
# set a command flag bit that is not documented for the particular command").
# FUA is valid on every command once SEND_FUA is negotiated; PAYLOAD_LEN only
# with extended headers.  Availability also depends on transmission flags,
# which transmission.py checks.
FLAGS_VALID_FOR: dict[Command, CommandFlag] = {
    Command.READ: CommandFlag.FUA | CommandFlag.DF,
    Command.WRITE: CommandFlag.FUA | CommandFlag.PAYLOAD_LEN,
    Command.DISC: CommandFlag(0),
    Command.FLUSH: CommandFlag.FUA,
    Command.TRIM: CommandFlag.FUA,
    Command.CACHE: CommandFlag.FUA,
    Command.WRITE_ZEROES: CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
    Command.BLOCK_STATUS: CommandFlag.FUA | CommandFlag.REQ_ONE,
}
