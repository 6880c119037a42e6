"""Option haggling: the fixed newstyle handshake as a sans-IO state machine.

Spec: "Protocol phases / Handshake / Newstyle negotiation" and "Fixed newstyle
negotiation", "Termination of the session during option haggling", "TLS
support / Server-side requirements" (the three modes: tls_policy.py), "Values /
Handshake phase" (flags, option types, option reply types), "Metadata
querying", and the EXTENDED_HEADERS extension's NBD_OPT_EXTENDED_HEADERS.

Feed bytes with :meth:`Handshake.receive_data`, collect bytes to send with
:meth:`Handshake.data_to_send`, and ask :meth:`Handshake.next_event` what to do.
Oldstyle negotiation is not served.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from . import meta_contexts, wire
from .constants import (
    IHAVEOPT,
    MAX_STRING_LENGTH,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    Reply,
)
from .events import Close, EnterTransmission, Event, NeedData, StartTLS
from .export import ExportInfo, Negotiated
from .phases import HANDSHAKE_TRANSITIONS, HandshakePhase, HandshakeTrigger, PhaseMachine
from .tls_policy import TLSPolicy

Tracer = Callable[[str, str, Mapping[str, object]], None]
# Phases in which bytes from the client are kept: the rest drop them.
_READING = (HandshakePhase.AWAITING_CLIENT_FLAGS, HandshakePhase.HAGGLING)


@dataclass(frozen=True, slots=True)
class HandshakeLimits:
    """Bounds on what a client may make the server read during haggling."""

    # The largest option payload read; a larger claimed length is refused
    # with NBD_REP_ERR_TOO_BIG and a hard disconnect (never read).  Enough for
    # a 4096-byte name with many queries.
    max_option_payload: int = 64 * 1024
    # Queries per NBD_OPT_LIST/SET_META_CONTEXT ("MAY fail with ERR_TOO_BIG").
    max_meta_queries: int = 128
    # Options per connection before the server treats the client as hostile.
    max_options: int = 1024


class Handshake:
    """The server side of one connection's option haggling."""

    def __init__(
        self,
        exports: Mapping[str, ExportInfo],
        *,
        tls_available: bool = False,
        limits: HandshakeLimits | None = None,
        trace: Tracer | None = None,
    ) -> None:
        self._exports = exports
        # NOTLS without credentials; FORCEDTLS or SELECTIVETLS with them, as
        # the exports' tls_only flags say.
        self._tls = TLSPolicy.for_server(tls_available, exports.values())
        self._limits = limits or HandshakeLimits()
        self._trace = trace
        self._in = bytearray()
        self._out: list[bytes] = []
        self._fixed_newstyle = False
        self._no_zeroes = False
        self._options_seen = 0
        self._refusal: tuple[Reply, str] | None = None
        self._reset_negotiation()
        # The phase changes only through HANDSHAKE_TRANSITIONS (phases.py).
        self._phases = PhaseMachine(HANDSHAKE_TRANSITIONS)
        handshake_flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        self._send(wire.pack_greeting(handshake_flags), "greeting", flags=handshake_flags)

    # ------------------------------------------------------------ public API

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes read from the client (ignored once TLS is pending or haggling ended)."""
        if self._phases.phase in _READING:
            self._in += data
        # Bytes arriving in clear while TLS is being set up are dropped: nothing
        # sent before the TLS session may be acted on after it ("Protocol
        # downgrade attacks", CVE-2021-3716-style injection).

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def buffered(self) -> bytes:
        """Bytes received after the final option: the start of transmission."""
        return bytes(self._in) if self._phases.phase is HandshakePhase.FINISHED else b""

    @property
    def phase(self) -> HandshakePhase:
        return self._phases.phase

    def refuse(self, reply: Reply, message: str) -> None:
        """Error every further option with ``reply`` (a full server, or one shutting down).

        "Termination of the session during option haggling": the server MUST
        simply error inbound options until the client gets the hint.
        """
        self._refusal = (reply, message)

    def tls_established(self) -> None:
        """The TLS handshake succeeded; negotiation restarts from a clean slate.

        "NBD_OPT_STARTTLS": the server MUST NOT preserve any negotiation state
        issued before this command.
        """
        self._phases.fire(HandshakeTrigger.TLS_ESTABLISHED)
        self._tls.established()
        self._reset_negotiation()
        self._in.clear()

    def next_event(self) -> Event:
        while True:
            event: Event | None
            phase = self._phases.phase
            if phase is HandshakePhase.AWAITING_CLIENT_FLAGS:
                event = self._read_client_flags()
            elif phase is HandshakePhase.HAGGLING:
                event = self._read_option()
            elif phase is HandshakePhase.TLS_PENDING:
                return NeedData()
            else:
                return Close("handshake already finished")
            if event is not None:
                return event

    # ------------------------------------------------------------- internals

    def _reset_negotiation(self) -> None:
        self._structured = False
        self._extended = False
        self._meta_export: bytes | None = None
        self._meta_contexts: dict[int, str] = {}

    def _send(self, data: bytes, kind: str, **fields: object) -> None:
        self._out.append(data)
        if self._trace:
            self._trace("S", kind, fields)

    def _reply(self, option: int, reply: Reply, payload: bytes = b"", **fields: object) -> None:
        self._send(
            wire.pack_option_reply(option, reply, payload),
            "option reply",
            option=Option(option),
            reply=reply,
            length=len(payload),
            **fields,
        )

    def _error(self, option: int, reply: Reply, message: str) -> None:
        text = message.encode("utf-8", "replace")[:MAX_STRING_LENGTH]
        self._reply(option, reply, text, message=message)

    def _read_client_flags(self) -> Event | None:
        if len(self._in) < wire.CLIENT_FLAGS.size:
            return NeedData()
        (raw,) = wire.CLIENT_FLAGS.unpack_from(self._in)
        del self._in[: wire.CLIENT_FLAGS.size]
        flags = ClientFlag(raw)
        if self._trace:
            self._trace("C", "client flags", {"flags": flags})
        # As an int: ~ on an IntFlag inverts only the defined bits.
        known = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
        if raw & ~known:
            # "the server MUST drop the TCP connection if the client sets an
            # unknown flag" (Values / Handshake phase / Client flags).
            return self._close(f"client set unknown flags {raw & ~known:#x}")
        self._fixed_newstyle = bool(flags & ClientFlag.C_FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
        # "The server MUST operate in NOTLS mode unless ... the client
        # replied with NBD_FLAG_C_FIXED_NEWSTYLE": TLS cannot happen.
        self._tls.client_flags(self._fixed_newstyle)
        self._phases.fire(HandshakeTrigger.CLIENT_FLAGS_ACCEPTED)
        return None

    def _close(
        self, reason: str, trigger: HandshakeTrigger = HandshakeTrigger.HARD_DISCONNECT
    ) -> Close:
        self._phases.fire(trigger)
        return Close(reason, clean=trigger is HandshakeTrigger.ABORT_RECEIVED)

    def _read_option(self) -> Event | None:
        header = wire.OPTION_HEADER
        if len(self._in) < header.size:
            return NeedData()
        magic, option_number, length = header.unpack_from(self._in)
        option = Option(option_number)
        if magic != IHAVEOPT:
            return self._close(f"bad option magic {magic:#x}")
        self._options_seen += 1
        if self._options_seen > self._limits.max_options:
            return self._close(f"more than {self._limits.max_options} options")
        if length > self._limits.max_option_payload:
            # CVE-2017-15119: never read (or allocate for) a length the client claims.
            if self._trace:
                self._trace("C", "option", {"option": option, "length": length})
            self._error(
                option_number,
                Reply.ERR_TOO_BIG,
                f"option payload of {length} bytes exceeds the limit of "
                f"{self._limits.max_option_payload}",
            )
            return self._close("option payload too large")
        if len(self._in) < header.size + length:
            return NeedData()
        payload = bytes(self._in[header.size : header.size + length])
        del self._in[: header.size + length]
        if self._trace:
            self._trace("C", "option", {"option": option, "length": length, "data": payload})
        return self._handle_option(option, payload)

    def _handle_option(self, option: Option, payload: bytes) -> Event | None:
        if option == Option.ABORT:
            # "The server MUST reply with NBD_REP_ACK" and the client then closes.
            self._reply(option, Reply.ACK)
            return self._close("client sent NBD_OPT_ABORT", HandshakeTrigger.ABORT_RECEIVED)
        if option == Option.EXPORT_NAME:
            return self._export_name(payload)
        # A refused client gets its refusal; FORCEDTLS before TLS, every option
        # (NBD_OPT_INFO and unknown ones included) NBD_REP_ERR_TLS_REQD.
        refusal = self._refusal or self._tls.option_refusal(option)
        if refusal is not None:
            self._error(option, *refusal)
            return None
        handler = self._HANDLERS.get(option)
        if handler is None:
            self._error(option, Reply.ERR_UNSUP, f"option {option.name} is not supported")
            return None
        return handler(self, option, payload)

    # -------------------------------------------------------------- options

    def _export_name(self, payload: bytes) -> Event:
        # "If the chosen export does not exist or requirements for the chosen
        # export are not met ... the server MUST terminate the session."
        if self._refusal is not None:
            return self._close(f"refused: {self._refusal[1]}")
        if self._extended:
            return self._close("NBD_OPT_EXPORT_NAME after extended headers were negotiated")
        if len(payload) > MAX_STRING_LENGTH:
            return self._close(f"export name of {len(payload)} bytes")
        export = self._lookup(payload)
        if export is None or not self._tls.usable(export):
            # Unknown, or TLS-only before TLS (FORCEDTLS and SELECTIVETLS): "as
            # this request cannot error, it MUST terminate the session".
            return self._close(f"export {_shorten(payload)} is unknown or needs TLS")
        if not export.block_sizes.is_default:
            # "Size constraints": a server with non-default constraints MAY
            # refuse NBD_OPT_EXPORT_NAME via a hard disconnect.
            return self._close("export needs NBD_INFO_BLOCK_SIZE; use NBD_OPT_GO")
        negotiated = self._negotiated(export, payload, block_sizes_agreed=False)
        self._send(
            wire.pack_export_name_reply(export.size, negotiated.flags, self._no_zeroes),
            "export name reply",
            size=export.size,
            flags=negotiated.flags,
            zeroes=not self._no_zeroes,
        )
        self._phases.fire(HandshakeTrigger.EXPORT_NAME_ANSWERED)
        return EnterTransmission(negotiated)

    def _info_or_go(self, option: Option, payload: bytes) -> Event | None:
        try:
            request = wire.unpack_info_request(payload)
        except wire.MalformedPayload as exc:
            self._error(option, Reply.ERR_INVALID, f"malformed {option.name}: {exc}")
            return None
        if len(request.name) > MAX_STRING_LENGTH:
            self._error(
                option,
                Reply.ERR_INVALID,
                f"export name of {len(request.name)} bytes exceeds {MAX_STRING_LENGTH}",
            )
            return None
        export = self._lookup(request.name)
        refusal = self._tls.export_refusal(_shorten(request.name), export)
        if refusal is not None:
            # No NBD_REP_INFO before NBD_REP_ERR_TLS_REQD: a TLS-only export
            # looks like an unknown one.
            self._error(option, *refusal)
            return None
        assert export is not None  # export_refusal refuses unknown exports
        negotiated = self._negotiated(
            export, request.name, block_sizes_agreed=Info.BLOCK_SIZE in request.requests
        )
        self._reply(
            option,
            Reply.INFO,
            wire.pack_info_export(export.size, negotiated.flags),
            info=Info.EXPORT,
            size=export.size,
            flags=negotiated.flags,
        )
        if Info.NAME in request.requests:
            self._reply(
                option,
                Reply.INFO,
                wire.pack_info_string(Info.NAME, export.name.encode()),
                info=Info.NAME,
                name=export.name,
            )
        if Info.DESCRIPTION in request.requests and export.description:
            self._reply(
                option,
                Reply.INFO,
                wire.pack_info_string(Info.DESCRIPTION, export.description.encode()),
                info=Info.DESCRIPTION,
                description=export.description,
            )
        sizes = export.block_sizes
        # Sent whether asked or not: a client that did not ask may ignore it.
        self._reply(
            option,
            Reply.INFO,
            wire.pack_info_block_size(sizes.minimum, sizes.preferred, sizes.maximum),
            info=Info.BLOCK_SIZE,
            minimum=sizes.minimum,
            preferred=sizes.preferred,
            maximum=sizes.maximum,
        )
        if option == Option.GO and not sizes.is_default and not negotiated.block_sizes_agreed:
            self._error(
                option,
                Reply.ERR_BLOCK_SIZE_REQD,
                f"this export needs {sizes.minimum}-byte alignment: request NBD_INFO_BLOCK_SIZE",
            )
            return None
        self._reply(option, Reply.ACK)
        if option == Option.INFO:
            return None
        self._phases.fire(HandshakeTrigger.GO_ACKNOWLEDGED)
        return EnterTransmission(negotiated)

    def _list(self, option: Option, payload: bytes) -> Event | None:
        if payload:
            self._error(option, Reply.ERR_INVALID, "NBD_OPT_LIST takes no data")
            return None
        for export in filter(self._tls.usable, self._exports.values()):
            self._reply(
                option,
                Reply.SERVER,
                wire.pack_rep_server(export.name.encode(), export.description.encode()),
                name=export.name,
                description=export.description,
            )
        self._reply(option, Reply.ACK)
        return None

    def _starttls(self, option: Option, payload: bytes) -> Event | None:
        if payload:
            self._error(option, Reply.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            return None
        refusal = self._tls.starttls_refusal()
        if refusal is not None:
            self._error(option, *refusal)
            return None
        self._reply(option, Reply.ACK)
        self._in.clear()  # nothing sent in clear after STARTTLS is acted on
        self._phases.fire(HandshakeTrigger.STARTTLS_ACKNOWLEDGED)
        return StartTLS()

    def _structured_reply(self, option: Option, payload: bytes) -> Event | None:
        if payload:
            self._error(option, Reply.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            return None
        if self._extended:
            self._error(
                option,
                Reply.ERR_EXT_HEADER_REQD,
                "extended headers are already negotiated and take precedence",
            )
            return None
        self._structured = True
        self._reply(option, Reply.ACK)
        return None

    def _extended_headers(self, option: Option, payload: bytes) -> Event | None:
        if payload:
            self._error(option, Reply.ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data")
            return None
        self._extended = True
        self._reply(option, Reply.ACK)
        return None

    def _meta_context(self, option: Option, payload: bytes) -> Event | None:
        setting = option == Option.SET_META_CONTEXT
        if setting:
            # "Issuing this command replaces all previously-set metadata
            # contexts (including when this command fails)".
            self._meta_export = None
            self._meta_contexts = {}
            if not (self._structured or self._extended):
                self._error(
                    option,
                    Reply.ERR_INVALID,
                    "negotiate NBD_OPT_STRUCTURED_REPLY before NBD_OPT_SET_META_CONTEXT",
                )
                return None
        try:
            request = wire.unpack_meta_context_request(payload, self._limits.max_meta_queries)
        except wire.MalformedPayload as exc:
            self._error(option, Reply.ERR_INVALID, f"malformed {option.name}: {exc}")
            return None
        except OverflowError as exc:
            self._error(option, Reply.ERR_TOO_BIG, str(exc))
            return None
        if len(request.name) > MAX_STRING_LENGTH or any(
            len(q) > MAX_STRING_LENGTH for q in request.queries
        ):
            self._error(option, Reply.ERR_INVALID, f"a string exceeds {MAX_STRING_LENGTH} bytes")
            return None
        export = self._lookup(request.name)
        if export is None or not self._tls.usable(export):
            # A TLS-only export before TLS is as unknown: NBD_REP_ERR_TLS_REQD
            # is reserved to NBD_OPT_INFO, NBD_OPT_GO and NBD_OPT_EXPORT_NAME.
            self._error(option, Reply.ERR_UNKNOWN, f"no export named {_shorten(request.name)}")
            return None
        if any(b":" not in q for q in request.queries):
            self._error(option, Reply.ERR_INVALID, "a query lacks the namespace colon")
            return None
        # Contexts with 64-bit status without extended headers: meta_contexts.answer.
        answer = meta_contexts.answer(export, request.queries, setting, self._extended)
        for context in answer.named:
            context_id = context.context_id if setting else 0
            self._reply(
                option,
                Reply.META_CONTEXT,
                wire.pack_meta_context(context_id, context.name.encode()),
                context_id=context_id,
                context=context.name,
            )
        if setting:
            self._meta_export = request.name
            self._meta_contexts = {c.context_id: c.name for c in answer.named}
        elif answer.held_back:
            text = f"{answer.held_back}: negotiate NBD_OPT_EXTENDED_HEADERS to use it"
            self._error(option, Reply.ERR_EXT_HEADER_REQD, text)
            return None
        omitted = {"omitted": answer.held_back} if answer.held_back else {}
        self._reply(option, Reply.ACK, b"", **omitted)
        return None

    _HANDLERS: dict[Option, Callable[[Handshake, Option, bytes], Event | None]] = {
        Option.INFO: _info_or_go,
        Option.GO: _info_or_go,
        Option.LIST: _list,
        Option.STARTTLS: _starttls,
        Option.STRUCTURED_REPLY: _structured_reply,
        Option.LIST_META_CONTEXT: _meta_context,
        Option.SET_META_CONTEXT: _meta_context,
        Option.EXTENDED_HEADERS: _extended_headers,
    }

    # -------------------------------------------------------------- helpers

    def _lookup(self, name: bytes) -> ExportInfo | None:
        try:
            return self._exports.get(name.decode("utf-8"))
        except UnicodeDecodeError:
            return None

    def _negotiated(self, export: ExportInfo, name: bytes, block_sizes_agreed: bool) -> Negotiated:
        replies = self._structured or self._extended
        # Contexts count only if the last SET named the export now chosen.
        contexts = dict(self._meta_contexts) if self._meta_export == name else {}
        return Negotiated(
            export=export,
            flags=export.transmission_flags(structured_replies=replies),
            structured_replies=replies,
            extended_headers=self._extended,
            meta_contexts=contexts,
            block_sizes_agreed=block_sizes_agreed,
        )


def _shorten(name: bytes, limit: int = 64) -> str:
    """A printable, bounded rendering of a client-supplied name (CVE-2020-10761)."""
    text = name[:limit].decode("utf-8", "replace")
    return repr(text) + ("..." if len(name) > limit else "")
