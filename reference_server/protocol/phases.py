"""The phases of the protocol core's state machines, and their transition tables.

h11 keeps every transition of HTTP/1.1 in one table a reader can check against
the RFC; this module does the same for NBD.  Each machine has a phase enum, a
trigger enum (what happened), and one :class:`TransitionTable` that maps
(phase, trigger) to the next phase, with the spec heading path that allows the
transition beside it.  A :class:`PhaseMachine` is the only thing that changes
a phase, and only through its table: a transition not in the table raises
:class:`LocalProtocolError`, because it means the code (not the client) broke
the protocol.

The tables are data: the docs render them as state diagrams
(``docs/_ext/nbddocs/``, ``.. nbd-state-diagram::``), and the unit tests
check that every transition is reachable from bytes on the wire.

Spec: "Protocol phases / Handshake" and "Protocol phases / Transmission".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar


class LocalProtocolError(RuntimeError):
    """The core was asked for a transition its table does not allow (h11's name).

    A client's misbehaviour never raises this: it becomes an error reply or a
    Close event.  This is a bug in the caller of the core.
    """


P = TypeVar("P", bound=Enum)
T = TypeVar("T", bound=Enum)


@dataclass(frozen=True, slots=True)
class Transition(Generic[P, T]):
    """One row of a transition table: in ``source``, ``trigger`` leads to ``target``."""

    source: P
    trigger: T
    target: P
    #: The spec heading path that allows this transition ("Protocol phases / ...").
    section: str


class TransitionTable(Generic[P, T]):
    """Every transition of one state machine, and nothing else.

    The shape the docs generator reads: ``title``, ``initial``, ``phases``
    (the phase enum) and ``transitions`` (rows with source, trigger, target and
    section).  Any object with those attributes can be rendered.
    """

    def __init__(self, title: str, initial: P, transitions: Iterable[Transition[P, T]]) -> None:
        self.title = title
        self.initial = initial
        self.phases: type[P] = type(initial)
        self.transitions = tuple(transitions)
        self._next: dict[tuple[P, T], P] = {}
        for row in self.transitions:
            key = (row.source, row.trigger)
            if key in self._next:
                raise ValueError(f"{title}: {row.source.name} + {row.trigger.name} listed twice")
            self._next[key] = row.target

    def target(self, phase: P, trigger: T) -> P:
        """The phase ``trigger`` leads to from ``phase``; LocalProtocolError if none."""
        try:
            return self._next[phase, trigger]
        except KeyError:
            raise LocalProtocolError(
                f"{self.title}: {trigger.name} is not allowed in {phase.name}"
            ) from None


class PhaseMachine(Generic[P, T]):
    """The current phase of one connection's machine; it moves only along its table."""

    __slots__ = ("_phase", "table")

    def __init__(self, table: TransitionTable[P, T]) -> None:
        self.table = table
        self._phase = table.initial

    @property
    def phase(self) -> P:
        return self._phase

    def fire(self, trigger: T) -> P:
        """Take the transition ``trigger`` names from the current phase."""
        self._phase = self.table.target(self._phase, trigger)
        return self._phase


# ------------------------------------------------------------------ handshake


class HandshakePhase(Enum):
    """Where option haggling stands ("Protocol phases / Handshake")."""

    AWAITING_CLIENT_FLAGS = "the greeting is sent; the client's 32 bits of flags are awaited"
    HAGGLING = "options are read and answered one at a time"
    TLS_PENDING = "NBD_OPT_STARTTLS was acknowledged; the transport runs the TLS handshake"
    FINISHED = "an export was chosen; the transmission phase owns the connection"
    CLOSED = "the session was terminated; nothing more is read"


class HandshakeTrigger(Enum):
    """What moves option haggling on."""

    CLIENT_FLAGS_ACCEPTED = "the client flags are known and acceptable"
    STARTTLS_ACKNOWLEDGED = "NBD_OPT_STARTTLS was answered with NBD_REP_ACK"
    TLS_ESTABLISHED = "the transport finished the TLS handshake"
    GO_ACKNOWLEDGED = "NBD_OPT_GO was answered with NBD_REP_ACK"
    EXPORT_NAME_ANSWERED = "NBD_OPT_EXPORT_NAME named an export that may be served"
    ABORT_RECEIVED = "NBD_OPT_ABORT: a soft disconnect"
    HARD_DISCONNECT = "a violation the server answers by dropping the connection"


_H = HandshakePhase
_HT = HandshakeTrigger

HANDSHAKE_TRANSITIONS: TransitionTable[HandshakePhase, HandshakeTrigger] = TransitionTable(
    "handshake",
    _H.AWAITING_CLIENT_FLAGS,
    [
        Transition(
            _H.AWAITING_CLIENT_FLAGS,
            _HT.CLIENT_FLAGS_ACCEPTED,
            _H.HAGGLING,
            "Protocol phases / Handshake / Fixed newstyle negotiation",
        ),
        Transition(
            _H.AWAITING_CLIENT_FLAGS,
            _HT.HARD_DISCONNECT,
            _H.CLOSED,
            "Values / Handshake phase / Flag fields / Client flags",
        ),
        Transition(
            _H.HAGGLING,
            _HT.STARTTLS_ACKNOWLEDGED,
            _H.TLS_PENDING,
            "Values / Handshake phase / Option types / NBD_OPT_STARTTLS",
        ),
        Transition(
            _H.TLS_PENDING,
            _HT.TLS_ESTABLISHED,
            _H.HAGGLING,
            "TLS support / Security considerations / Protocol downgrade attacks",
        ),
        Transition(
            _H.HAGGLING,
            _HT.GO_ACKNOWLEDGED,
            _H.FINISHED,
            "Values / Handshake phase / Option types / NBD_OPT_GO",
        ),
        Transition(
            _H.HAGGLING,
            _HT.EXPORT_NAME_ANSWERED,
            _H.FINISHED,
            "Values / Handshake phase / Option types / NBD_OPT_EXPORT_NAME",
        ),
        Transition(
            _H.HAGGLING,
            _HT.ABORT_RECEIVED,
            _H.CLOSED,
            "Protocol phases / Handshake / Termination of the session during option haggling",
        ),
        Transition(
            _H.HAGGLING,
            _HT.HARD_DISCONNECT,
            _H.CLOSED,
            "Protocol phases / Handshake / Termination of the session during option haggling",
        ),
    ],
)


# --------------------------------------------------------------- transmission


class TransmissionPhase(Enum):
    """What the transmission parser expects next ("Protocol phases / Transmission")."""

    AWAITING_REQUEST = "the next bytes are a request header"
    RECEIVING_PAYLOAD = "the next bytes are the payload of an accepted NBD_CMD_WRITE"
    DISCARDING_PAYLOAD = "the next bytes are the payload of a rejected request, to be skipped"
    CLOSED = "transmission was terminated; nothing more is read"


class TransmissionTrigger(Enum):
    """What moves the transmission parser on."""

    PAYLOAD_EXPECTED = "an accepted request's header announced a payload not yet received"
    PAYLOAD_RECEIVED = "the whole payload is here; the request is handed out"
    REJECTED_WITH_PAYLOAD = "a rejected request announced a payload not yet received"
    PAYLOAD_DISCARDED = "the rejected request's payload has been skipped"
    DISC_RECEIVED = "NBD_CMD_DISC: a soft disconnect"
    BAD_MAGIC = "a request header without the request magic: framing is lost"
    PAYLOAD_TOO_LARGE = "a payload length large enough to be a denial of service"


_X = TransmissionPhase
_XT = TransmissionTrigger

TRANSMISSION_TRANSITIONS: TransitionTable[TransmissionPhase, TransmissionTrigger] = TransitionTable(
    "transmission",
    _X.AWAITING_REQUEST,
    [
        Transition(
            _X.AWAITING_REQUEST,
            _XT.PAYLOAD_EXPECTED,
            _X.RECEIVING_PAYLOAD,
            "Protocol phases / Transmission / Request message",
        ),
        Transition(
            _X.RECEIVING_PAYLOAD,
            _XT.PAYLOAD_RECEIVED,
            _X.AWAITING_REQUEST,
            "Values / Transmission phase / Request types / NBD_CMD_WRITE",
        ),
        Transition(
            _X.AWAITING_REQUEST,
            _XT.REJECTED_WITH_PAYLOAD,
            _X.DISCARDING_PAYLOAD,
            "Protocol phases / Transmission / Request message",
        ),
        Transition(
            _X.DISCARDING_PAYLOAD,
            _XT.PAYLOAD_DISCARDED,
            _X.AWAITING_REQUEST,
            "Protocol phases / Transmission / Request message",
        ),
        Transition(
            _X.AWAITING_REQUEST,
            _XT.DISC_RECEIVED,
            _X.CLOSED,
            "Protocol phases / Transmission / Terminating the transmission phase",
        ),
        Transition(
            _X.AWAITING_REQUEST,
            _XT.BAD_MAGIC,
            _X.CLOSED,
            "Protocol phases / Transmission / Terminating the transmission phase",
        ),
        Transition(
            _X.AWAITING_REQUEST,
            _XT.PAYLOAD_TOO_LARGE,
            _X.CLOSED,
            "Size constraints",
        ),
    ],
)

#: Every table of the protocol core, for the docs and the tests.
TABLES = (HANDSHAKE_TRANSITIONS, TRANSMISSION_TRANSITIONS)
