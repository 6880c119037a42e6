"""Events the sans-IO protocol core hands to its transport.

The core never touches a socket: it consumes bytes, queues bytes to send, and
returns one of these to say what the transport must do next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .export import Negotiated
from .wire import RequestHeader


@dataclass(frozen=True, slots=True)
class NeedData:
    """Nothing more can happen until more bytes arrive."""


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Send what is queued, then run the TLS handshake and call ``tls_established``."""


@dataclass(frozen=True, slots=True)
class EnterTransmission:
    """Option haggling is over; the client uses ``negotiated`` from now on."""

    negotiated: Negotiated


@dataclass(frozen=True, slots=True)
class Close:
    """Send what is queued, then close the connection.

    ``clean`` is true for a soft disconnect (NBD_OPT_ABORT, NBD_CMD_DISC) and
    false for a hard disconnect forced by a protocol violation.
    """

    reason: str
    clean: bool = False


class Request(NamedTuple):
    """A validated transmission request, ready to run.

    ``header`` holds the request message's fields (its command is a
    ``constants.Command``); ``payload`` holds the data of NBD_CMD_WRITE and
    is empty otherwise.  ``in_store`` says the write's payload was received
    straight into the store (``Transmission.write_target``): it is already
    in place, ``payload`` is empty, and only the commit step remains.  A
    named tuple: one is made per request.
    """

    header: RequestHeader
    payload: bytes | bytearray | memoryview = b""
    in_store: bool = False


Event = NeedData | StartTLS | EnterTransmission | Close | Request
