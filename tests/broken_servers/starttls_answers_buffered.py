"""A BROKEN reference server: answers, in clear, an option pipelined behind NBD_OPT_STARTTLS.

After the NBD_REP_ACK to STARTTLS "all further data MUST be sent and received
over TLS".  This server first serves whatever options it already buffered, as
if they had come over TLS, and replies to them in plaintext: the STARTTLS
command-injection class (a man in the middle appends options to the client's
STARTTLS).  For the project's own tests only (tests/test_suite_can_fail.py).

    starttls_answers_buffered.py [reference server options...]
"""

from __future__ import annotations

import sys

from patched_server import import_reference_server, serve_with


def main() -> int:
    import_reference_server()
    from reference_server import connection
    from reference_server.protocol.constants import Option, Reply
    from reference_server.protocol.events import Event, NeedData, StartTLS
    from reference_server.protocol.handshake import Handshake
    from reference_server.protocol.phases import HandshakeTrigger

    class InjectableHandshake(Handshake):
        upgrading = False

        def _handle_option(self, option: Option, payload: bytes) -> Event | None:
            if option == Option.STARTTLS and self._tls.starttls_refusal() is None:
                self._reply(option, Reply.ACK)
                # The bug: keep the buffered bytes, and trust them as if over TLS.
                self._tls.active = self.upgrading = True
                return None
            return super()._handle_option(option, payload)

        def next_event(self) -> Event:
            event = super().next_event()
            if self.upgrading and isinstance(event, NeedData):
                self.upgrading = self._tls.active = False
                self._phases.fire(HandshakeTrigger.STARTTLS_ACKNOWLEDGED)
                return StartTLS()
            return event

    return serve_with(connection, "Handshake", InjectableHandshake, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
