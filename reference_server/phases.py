"""The phases of one client connection, and the one table that moves between them.

A connection's phase changes only through :func:`advance`, which looks the
move up in :data:`TRANSITIONS`; each move names the part of the spec
(docs/spec/proto.md, by heading path) that calls for it.  A move that is not
in the table is a bug in the transport, and raises.

``SHUTTING_DOWN`` is a phase of its own beside ``DRAINING`` because they
differ: a client that sent NBD_CMD_DISC is drained (what it sent is served,
nothing more is read), while during a server shutdown the server still reads
and answers every new request with NBD_ESHUTDOWN.
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    WAITING_FOR_SLOT = "accepted, not yet greeted: waiting for a slot under --shared"
    HANDSHAKE = "option haggling"
    TLS_HANDSHAKE = "NBD_OPT_STARTTLS acknowledged: the TLS handshake runs"
    TRANSMISSION = "serving requests"
    SHUTTING_DOWN = "server shutdown: received requests are served, new ones get ESHUTDOWN"
    DRAINING = "NBD_CMD_DISC received: serve what came, read no more, then close"
    CLOSED = "closed, or closing"


class Trigger(enum.Enum):
    ADMITTED = "a slot under --shared (or a refusal, which is greeted too)"
    STARTTLS = "NBD_OPT_STARTTLS acknowledged"
    TLS_ESTABLISHED = "the TLS handshake completed"
    NEGOTIATED = "NBD_OPT_GO / NBD_OPT_EXPORT_NAME succeeded"
    SERVER_STOPPING = "the server is shutting down"
    DISCONNECT = "NBD_CMD_DISC"
    CLOSE = "either side ends the connection"


_HAGGLING = "Protocol phases / Handshake / Termination of the session during option haggling"
_STARTTLS = "Values / Handshake phase / Option types (NBD_OPT_STARTTLS)"
_TLS = "TLS support / Server-side requirements / FORCEDTLS mode"
_TERMINATING = "Protocol phases / Transmission / Terminating the transmission phase"

# (phase, trigger) -> (next phase, the spec section that governs the move)
TRANSITIONS: dict[tuple[Phase, Trigger], tuple[Phase, str]] = {
    # Greeted once admitted; a client refused under --shared is greeted too,
    # then every option is errored "until the client gets the hint that it is
    # unwelcome".
    (Phase.WAITING_FOR_SLOT, Trigger.ADMITTED): (Phase.HANDSHAKE, _HAGGLING),
    (Phase.HANDSHAKE, Trigger.STARTTLS): (Phase.TLS_HANDSHAKE, _STARTTLS),
    # "After an NBD_REP_ACK reply has been sent, the server MUST be prepared for
    # a TLS handshake, and all further data MUST be sent and received over TLS."
    (Phase.TLS_HANDSHAKE, Trigger.TLS_ESTABLISHED): (Phase.HANDSHAKE, _TLS),
    # "Transmission mode can be entered (by the client sending NBD_OPT_EXPORT_NAME
    # or by the server responding to an NBD_OPT_GO with NBD_REP_ACK)".
    (Phase.HANDSHAKE, Trigger.NEGOTIATED): (Phase.TRANSMISSION, _HAGGLING),
    # "On a server shutdown, the server SHOULD wait for inflight requests to be
    # serviced ... any subsequently received requests SHOULD be NBD_ESHUTDOWN."
    (Phase.TRANSMISSION, Trigger.SERVER_STOPPING): (Phase.SHUTTING_DOWN, _TERMINATING),
    (Phase.SHUTTING_DOWN, Trigger.SERVER_STOPPING): (Phase.SHUTTING_DOWN, _TERMINATING),
    (Phase.DRAINING, Trigger.SERVER_STOPPING): (Phase.DRAINING, _TERMINATING),
    # "The client sends NBD_CMD_DISC whereupon the server MUST ... close the
    # TCP connection": after the requests that came before it are answered.
    (Phase.TRANSMISSION, Trigger.DISCONNECT): (Phase.DRAINING, _TERMINATING),
    (Phase.SHUTTING_DOWN, Trigger.DISCONNECT): (Phase.DRAINING, _TERMINATING),
}
# Either side may end the session from any phase (a hard disconnect, a
# client that vanished, a deadline); closing twice is harmless.
for _phase in Phase:
    _governing = (
        _TERMINATING
        if _phase in (Phase.TRANSMISSION, Phase.SHUTTING_DOWN, Phase.DRAINING)
        else _HAGGLING
    )
    TRANSITIONS[_phase, Trigger.CLOSE] = (Phase.CLOSED, _governing)


class BadTransition(RuntimeError):
    """The transport tried a move the table does not allow: a bug, not a client error."""


def advance(phase: Phase, trigger: Trigger) -> Phase:
    """The phase after ``trigger`` in ``phase``."""
    try:
        return TRANSITIONS[phase, trigger][0]
    except KeyError:
        raise BadTransition(f"{trigger.name} in phase {phase.name}") from None
