"""What a server did with a hostile message: an answer, a hard disconnect, or nothing in time.

The checks that send a server what a fragile implementation chokes on (the
CVE reproducers, malformed options) judge one of three outcomes: the answer
the spec allows, a hard disconnect ("Protocol phases / Handshake /
Termination of the session during option haggling" lets a server drop a
client that breaks a MUST), or silence, which no section allows.  They wait
a bounded time for it, never the client's longer default timeout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

from . import session
from .client import Disconnected, WireClient
from .results import OptionResult

#: Seconds a hostile check waits for the server's answer.
WAIT = 5.0
DISCONNECT = "disconnect"
NO_REPLY = "no reply"

T = TypeVar("T")


def within(client: WireClient, receive: Callable[[], T], wait: float = WAIT) -> T | str:
    """What RECEIVE() got within WAIT seconds, or DISCONNECT, or NO_REPLY."""
    client.sock.settimeout(wait)
    try:
        return receive()
    except Disconnected:
        return DISCONNECT
    except TimeoutError:
        return NO_REPLY
    finally:
        with contextlib.suppress(OSError):
            client.sock.settimeout(client.timeout)


def final_option_reply(client: WireClient, wait: float = WAIT) -> OptionResult | str:
    """The replies to the option just sent, DISCONNECT, or NO_REPLY."""
    return within(client, client.recv_option_result, wait)


def describe(outcome: object) -> str:
    """An outcome as a check's 'actual' value."""
    return outcome if isinstance(outcome, str) else outcome.describe()  # type: ignore[attr-defined]


def refused(outcome: object) -> bool:
    """An error reply or a hard disconnect: how a server may answer a request it will not serve."""
    if isinstance(outcome, str):
        return outcome == DISCONNECT
    return bool(outcome.final.is_error)  # type: ignore[attr-defined]


def option_outcome(
    client: WireClient, option: int, data: bytes, *, length: int | None = None, wait: float = WAIT
) -> str:
    """Send an option; the name of the final reply's type, DISCONNECT, or 'no reply within Ns'."""
    try:
        client.send_option(option, data, length=length)
    except Disconnected:
        return DISCONNECT
    outcome = final_option_reply(client, wait)
    if outcome == NO_REPLY:
        return f"{NO_REPLY} within {wait}s"
    return outcome if isinstance(outcome, str) else outcome.type.name


def option_on_new_connection(
    server: Any,
    option: int,
    data: bytes,
    *,
    length: int | None = None,
    first: tuple[int, ...] = (),
) -> OptionResult | str:
    """Negotiate a new connection, send OPTION (after the options FIRST), and judge the answer.

    The replies to OPTION, DISCONNECT or NO_REPLY; the connection is closed
    afterwards.  The options in FIRST (e.g. NBD_OPT_STRUCTURED_REPLY before a
    metadata-context option) are sent and their replies read first.
    """
    client = session.negotiated(server)
    try:
        for earlier in first:
            client.option(earlier)
        client.send_option(option, data, length=length)
        return final_option_reply(client)
    except Disconnected:
        return DISCONNECT
    finally:
        client.close()
