"""Which options and exports a connection may use, given where it stands with TLS.

Spec: "TLS support / Server-side requirements" and its three modes:

* NOTLS: the server has no TLS.  ``NBD_OPT_STARTTLS`` gets
  ``NBD_REP_ERR_POLICY``; nothing is ever answered ``NBD_REP_ERR_TLS_REQD``.
* FORCEDTLS: every export is TLS-only.  Before TLS, every option but
  ``NBD_OPT_STARTTLS`` (and ``NBD_OPT_ABORT``) gets ``NBD_REP_ERR_TLS_REQD``,
  and ``NBD_OPT_EXPORT_NAME`` terminates the session.
* SELECTIVETLS: TLS is offered, "mandatory on zero or more exports, and
  available at the client's option on all other exports".  Before TLS the
  plain exports are served; ``NBD_OPT_INFO``/``NBD_OPT_GO`` on a TLS-only
  export get ``NBD_REP_ERR_TLS_REQD`` and ``NBD_OPT_EXPORT_NAME`` on one
  terminates the session.  This server also hides what a client without TLS
  may not use: unknown exports get ``NBD_REP_ERR_TLS_REQD`` too (the "MAY
  reply with NBD_REP_ERR_TLS_REQD if that export is non-existent"), with no
  ``NBD_REP_INFO`` for either ("SHOULD NOT send NBD_REP_INFO replies for a
  TLS-only export"), ``NBD_OPT_LIST`` omits TLS-only exports, and the
  metadata-context options treat them as unknown (``NBD_REP_ERR_UNKNOWN``:
  ``NBD_REP_ERR_TLS_REQD`` is reserved to INFO, GO and EXPORT_NAME).

The server's mode follows from its configuration (:func:`server_mode`): no
TLS credentials is NOTLS; credentials with every export TLS-only is
FORCEDTLS; credentials with at least one export open to clients without TLS
is SELECTIVETLS.  A connection keeps its mode from the client flags to the
end ("it MUST be consistent in its mode of operation across the lifespan of
a single TCP connection"), with one exception the spec makes: "The server
MUST operate in NOTLS mode unless ... the client replied with
NBD_FLAG_C_FIXED_NEWSTYLE".  A SELECTIVETLS server therefore serves such a
client its plain exports and nothing else.  A FORCEDTLS server has nothing
to serve it (every export is TLS-only) but still talks to it in NOTLS mode:
its ``NBD_OPT_EXPORT_NAME`` terminates the session, as the spec requires
when "requirements for the chosen export are not met", and nothing else
ends it early ("A party MUST NOT initiate a hard disconnect save where set
out in this section").

No I/O here: the handshake (handshake.py) asks, and builds the replies.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from .constants import Option, Reply
from .export import ExportInfo

# Options FORCEDTLS lets through before TLS: STARTTLS itself, ABORT (answered
# before any policy), EXPORT_NAME (which cannot error: it terminates instead).
_BEFORE_FORCED_TLS = (Option.STARTTLS, Option.ABORT, Option.EXPORT_NAME)

Refusal = tuple[Reply, str]


class TLSMode(Enum):
    """The spec's three modes of operation ("TLS support / Server-side requirements")."""

    NOTLS = "the server operates entirely without TLS"
    FORCEDTLS = "the server insists upon TLS before any option but NBD_OPT_STARTTLS"
    SELECTIVETLS = "TLS is offered; mandatory on TLS-only exports, optional on the others"


def server_mode(tls_available: bool, exports: Iterable[ExportInfo]) -> TLSMode:
    """The mode a server with these credentials and exports runs in."""
    if not tls_available:
        return TLSMode.NOTLS
    if all(export.tls_only for export in exports):
        return TLSMode.FORCEDTLS
    return TLSMode.SELECTIVETLS


class TLSPolicy:
    """One connection's TLS state, and what it allows.

    ``mode`` is the connection's mode (the server's, or NOTLS for a client
    that is not fixed newstyle); ``active`` is true once TLS is established.
    """

    __slots__ = ("_server_has_tls", "active", "mode")

    def __init__(self, mode: TLSMode) -> None:
        self.mode = mode
        self._server_has_tls = mode is not TLSMode.NOTLS
        self.active = False

    @classmethod
    def for_server(cls, tls_available: bool, exports: Iterable[ExportInfo]) -> TLSPolicy:
        return cls(server_mode(tls_available, exports))

    def client_flags(self, fixed_newstyle: bool) -> None:
        """Settle the connection's mode from the client flags.

        "MUST operate in NOTLS mode unless ... NBD_FLAG_C_FIXED_NEWSTYLE": TLS
        cannot happen, so the TLS-only exports (under FORCEDTLS, all of them)
        are out of reach, and :meth:`usable` says so.
        """
        if not fixed_newstyle:
            self.mode = TLSMode.NOTLS

    def established(self) -> None:
        """The TLS handshake succeeded (after an acknowledged NBD_OPT_STARTTLS)."""
        self.active = True

    def usable(self, export: ExportInfo) -> bool:
        """Whether EXPORT may be used, listed or queried now."""
        return self.active or not (self._server_has_tls and export.tls_only)

    def option_refusal(self, option: Option) -> Refusal | None:
        """FORCEDTLS: before TLS, other options "MUST reply with NBD_REP_ERR_TLS_REQD"."""
        if self.mode is TLSMode.FORCEDTLS and not self.active and option not in _BEFORE_FORCED_TLS:
            return Reply.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS"
        return None

    def starttls_refusal(self) -> Refusal | None:
        """None to acknowledge NBD_OPT_STARTTLS, else the error to answer it with."""
        if self.active:
            # FORCEDTLS and SELECTIVETLS: "when TLS has already been negotiated, it
            # it MUST reply with NBD_REP_ERR_INVALID".
            return Reply.ERR_INVALID, "TLS is already active"
        if self.mode is TLSMode.NOTLS:
            # NOTLS: "MUST respond with NBD_REP_ERR_POLICY (if it does not support
            # TLS for policy reasons)".
            if self._server_has_tls:
                return Reply.ERR_POLICY, "TLS needs fixed newstyle negotiation"
            return Reply.ERR_POLICY, "TLS is not configured on this server"
        return None

    def export_refusal(self, name: str, export: ExportInfo | None) -> Refusal | None:
        """What NBD_OPT_INFO or NBD_OPT_GO naming EXPORT (None: unknown) must get, if not served.

        SELECTIVETLS before TLS: TLS-only and unknown exports alike get
        NBD_REP_ERR_TLS_REQD, so a client without TLS cannot tell them apart.
        """
        if export is not None and self.usable(export):
            return None
        if self.mode is TLSMode.SELECTIVETLS and not self.active:
            return Reply.ERR_TLS_REQD, f"export {name} needs TLS or does not exist"
        return Reply.ERR_UNKNOWN, f"no export named {name}"
