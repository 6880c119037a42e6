"""The phases of one client connection in the transport, and their one table.

The protocol core has its own machines (protocol/phases.py: what the byte
stream expects next); this one is the transport's: whether a connection is
waiting for a slot, negotiating, in TLS, serving, draining or closed.  It is
built from the core's :class:`~.protocol.phases.TransitionTable`, so a
:class:`~.protocol.phases.PhaseMachine` is the only thing that moves it, a
move the table does not list raises ``LocalProtocolError`` (a bug, never the
client's doing), and the docs draw it beside the core's (architecture.rst).
Each row names the heading of the spec (docs/spec/proto.md) that allows it.

``SHUTTING_DOWN`` is a phase of its own beside ``DRAINING`` because they
differ: a client that sent NBD_CMD_DISC is drained (what it sent is served,
nothing more is read), while during a server shutdown the server still reads
and answers each new request with NBD_ESHUTDOWN.
"""

from __future__ import annotations

from enum import Enum

from .protocol.phases import Transition, TransitionTable


class Phase(Enum):
    WAITING_FOR_SLOT = "accepted, not yet greeted: waiting for a slot under --shared"
    HANDSHAKE = "option haggling"
    TLS_HANDSHAKE = "NBD_OPT_STARTTLS acknowledged: the TLS handshake runs"
    TRANSMISSION = "serving requests"
    SHUTTING_DOWN = "server shutdown: received requests are served, new ones get ESHUTDOWN"
    DRAINING = "NBD_CMD_DISC received: serve what came, read no more, then close"
    CLOSED = "closed, or closing"


class Trigger(Enum):
    ADMITTED = "greeted: a slot under --shared, or a refusal (which is greeted too)"
    STARTTLS = "NBD_OPT_STARTTLS acknowledged"
    TLS_ESTABLISHED = "the TLS handshake completed"
    NEGOTIATED = "NBD_OPT_GO or NBD_OPT_EXPORT_NAME succeeded"
    SERVER_STOPPING = "the server is shutting down"
    DISCONNECT = "NBD_CMD_DISC"
    CLOSE = "either side ends the connection, or a deadline passed"


_HAGGLING = "Protocol phases / Handshake / Termination of the session during option haggling"
_STARTTLS = "Values / Handshake phase / Option types / NBD_OPT_STARTTLS"
_FORCEDTLS = "TLS support / Server-side requirements / FORCEDTLS mode"
_TERMINATING = "Protocol phases / Transmission / Terminating the transmission phase"

_P, _T = Phase, Trigger
_ROWS = [
    # Greeted once admitted; a client refused under --shared is greeted too,
    # then every option is errored "until the client gets the hint that it is
    # unwelcome".
    Transition(_P.WAITING_FOR_SLOT, _T.ADMITTED, _P.HANDSHAKE, _HAGGLING),
    # "The server MUST either reply with NBD_REP_ACK after which point the
    # connection is upgraded to TLS, or an error reply".
    Transition(_P.HANDSHAKE, _T.STARTTLS, _P.TLS_HANDSHAKE, _STARTTLS),
    # "After an NBD_REP_ACK reply has been sent, the server MUST be prepared for
    # a TLS handshake, and all further data MUST be sent and received over TLS."
    Transition(_P.TLS_HANDSHAKE, _T.TLS_ESTABLISHED, _P.HANDSHAKE, _FORCEDTLS),
    # "Transmission mode can be entered (by the client sending NBD_OPT_EXPORT_NAME
    # or by the server responding to an NBD_OPT_GO with NBD_REP_ACK)."
    Transition(_P.HANDSHAKE, _T.NEGOTIATED, _P.TRANSMISSION, _HAGGLING),
    # "On a server shutdown, the server SHOULD wait for inflight requests to be
    # serviced ... any subsequently received requests SHOULD be NBD_ESHUTDOWN."
    Transition(_P.TRANSMISSION, _T.SERVER_STOPPING, _P.SHUTTING_DOWN, _TERMINATING),
    Transition(_P.SHUTTING_DOWN, _T.SERVER_STOPPING, _P.SHUTTING_DOWN, _TERMINATING),
    Transition(_P.DRAINING, _T.SERVER_STOPPING, _P.DRAINING, _TERMINATING),
    # "The client sends NBD_CMD_DISC whereupon the server MUST ... close the TCP
    # connection": once the requests that came before it are answered.
    Transition(_P.TRANSMISSION, _T.DISCONNECT, _P.DRAINING, _TERMINATING),
    Transition(_P.SHUTTING_DOWN, _T.DISCONNECT, _P.DRAINING, _TERMINATING),
]
# Either side may end the session in any phase (a hard disconnect, a client
# that vanished, a deadline); closing twice is harmless.
_ROWS += [
    Transition(
        phase,
        _T.CLOSE,
        _P.CLOSED,
        _TERMINATING if phase in (_P.TRANSMISSION, _P.SHUTTING_DOWN, _P.DRAINING) else _HAGGLING,
    )
    for phase in Phase
]

CONNECTION_TRANSITIONS: TransitionTable[Phase, Trigger] = TransitionTable(
    "connection", Phase.WAITING_FOR_SLOT, _ROWS
)
