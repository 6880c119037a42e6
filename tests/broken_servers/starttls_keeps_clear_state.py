"""A BROKEN reference server: acts on options sent in clear and keeps them after STARTTLS.

With TLS required, NBD_OPT_STRUCTURED_REPLY and NBD_OPT_SET_META_CONTEXT sent
before TLS take effect, and what they negotiated survives NBD_OPT_STARTTLS,
which "MUST NOT preserve any negotiation state": nbdkit's CVE-2021-3716, where
a man in the middle injects options the client never sent.  For the project's
own tests only (tests/test_suite_can_fail.py).

    starttls_keeps_clear_state.py MODE [reference server options...]

``answered``  the two options are answered in clear (not NBD_REP_ERR_TLS_REQD),
              as nbdkit did.
``silent``    the reply is the correct NBD_REP_ERR_TLS_REQD, but the option
              takes effect anyway: only what happens after STARTTLS shows it.
"""

from __future__ import annotations

import sys

from patched_server import import_reference_server, mode_argument, serve_with

MODES = ("answered", "silent")


def main() -> int:
    mode = mode_argument(MODES)
    if mode is None:
        return 2
    import_reference_server()
    from reference_server import connection
    from reference_server.protocol.constants import Option
    from reference_server.protocol.events import Event
    from reference_server.protocol.handshake import Handshake

    in_clear = (Option.STRUCTURED_REPLY, Option.SET_META_CONTEXT)

    class LeakyHandshake(Handshake):
        def _handle_option(self, option: Option, payload: bytes) -> Event | None:
            if option in in_clear and not self._tls.active and self._refusal is None:
                queued = len(self._out)
                # Handled as if TLS were up (the export check passes too).
                self._tls.active = True
                try:
                    event = self._HANDLERS[option](self, option, payload)
                finally:
                    self._tls.active = False
                if mode == "answered":
                    return event
                del self._out[queued:]  # take effect, but say ERR_TLS_REQD
            return super()._handle_option(option, payload)

        def tls_established(self) -> None:
            kept = (self._structured, self._extended, self._meta_export, self._meta_contexts)
            super().tls_established()
            self._structured, self._extended, self._meta_export, self._meta_contexts = kept

    return serve_with(connection, "Handshake", LeakyHandshake, sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
