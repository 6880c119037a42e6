"""Every protocol number the raw-wire client needs, written from the spec.

Sources: /work/shared/spec/proto.md (cited by heading path) and, for
EXTENDED_HEADERS, proto-extension-ext-header.md.  Nothing here is shared with
``reference_server``: the oracle must not inherit the bugs of what it judges.

Enumerations tolerate unknown values read from the wire: ``Opt(0x1234)`` yields
a pseudo-member named ``UNKNOWN_0x1234`` instead of raising, so that a check can
report what a server actually sent.
"""

from __future__ import annotations

import enum
from typing import Any


class _Tolerant(enum.IntEnum):
    """An IntEnum that turns unknown wire values into named pseudo-members."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        if not isinstance(value, int):
            return None
        member = int.__new__(cls, value)
        member._name_ = f"UNKNOWN_{value:#x}"
        member._value_ = value
        return member


# "Handshake / Newstyle negotiation", "Protocol phases / Transmission",
# "Handshake / Fixed newstyle negotiation", "Reserved Magic values".
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", INIT_PASSWD
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
CLISERV_MAGIC = 0x00420281861253  # oldstyle negotiation
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REQUEST_MAGIC = 0x21E41C71  # ext-header extension
EXTENDED_REPLY_MAGIC = 0x6E8A278C  # ext-header extension

# "Conventions": strings "MUST be no longer than 4096 bytes".
STRING_MAX = 4096
# "Handshake / Newstyle negotiation": reserved zeroes after EXPORT_NAME.
EXPORT_NAME_ZEROES = 124
# "Size constraints": default maximum payload every server SHOULD accept.
DEFAULT_MAX_PAYLOAD = 1 << 25


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
    BLOCK_STATUS_PAYLOAD = 1 << 12  # ext-header extension


class Opt(_Tolerant):
    """Values / Handshake phase / Option types."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class Rep(_Tolerant):
    """Values / Handshake phase / Option reply types (errors have bit 31 set)."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR + 1
    ERR_POLICY = _REP_ERR + 2
    ERR_INVALID = _REP_ERR + 3
    ERR_PLATFORM = _REP_ERR + 4
    ERR_TLS_REQD = _REP_ERR + 5
    ERR_UNKNOWN = _REP_ERR + 6
    ERR_SHUTDOWN = _REP_ERR + 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
    ERR_TOO_BIG = _REP_ERR + 9
    ERR_EXT_HEADER_REQD = _REP_ERR + 10  # ext-header extension

    @property
    def is_error(self) -> bool:
        return bool(self & _REP_ERR)


class Info(_Tolerant):
    """Values / Handshake phase / Option reply types / NBD_REP_INFO types."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(_Tolerant):
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


class CmdFlag(enum.IntFlag):
    """Values / Transmission phase / Flag fields / Command flags."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5  # ext-header extension


class ReplyFlag(enum.IntFlag):
    """Values / Transmission phase / Flag fields / Structured reply flags."""

    DONE = 1 << 0


_CHUNK_ERR = 1 << 15


class ReplyType(_Tolerant):
    """Values / Transmission phase / Structured reply types (errors: bit 15)."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6  # ext-header extension
    ERROR = _CHUNK_ERR + 1
    ERROR_OFFSET = _CHUNK_ERR + 2

    @property
    def is_error(self) -> bool:
        return bool(self & _CHUNK_ERR)


class Errno(_Tolerant):
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


class AllocationState(enum.IntFlag):
    """Metadata querying / The base: metadata namespace / base:allocation."""

    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"
