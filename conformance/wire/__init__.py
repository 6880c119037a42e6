"""The conformance suite's independent raw-wire NBD client.

Written from the specification only (it must not share code with the
reference server it judges).  ``constants`` holds the protocol numbers,
``messages`` the struct layouts, ``results`` the aggregates handed back, and
``client`` the blocking socket client with timeouts everywhere.
"""

from .client import Disconnected, WireClient
from .constants import (
    BASE_ALLOCATION,
    STRING_MAX,
    AllocationState,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from .messages import ProtocolViolation
from .results import DisconnectResult, ExportNameResult, OptionResult, Reply

__all__ = [
    "BASE_ALLOCATION",
    "STRING_MAX",
    "AllocationState",
    "ClientFlag",
    "Cmd",
    "CmdFlag",
    "DisconnectResult",
    "Disconnected",
    "Errno",
    "ExportNameResult",
    "HandshakeFlag",
    "Info",
    "Opt",
    "OptionResult",
    "ProtocolViolation",
    "Rep",
    "Reply",
    "ReplyFlag",
    "ReplyType",
    "TransmissionFlag",
    "WireClient",
]
