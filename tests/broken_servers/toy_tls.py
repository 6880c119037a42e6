"""A toy FORCEDTLS NBD server whose TLS bugs can be switched on one at a time.

For tests/test_wire_checks_can_fail.py: it speaks just enough fixed-newstyle
NBD (options, STARTTLS, GO, READ, DISC) to run the TLS checks, and each field
of :class:`Bugs` switches on one historical bug: unknown client flags
ignored, options buffered behind NBD_OPT_STARTTLS answered in plaintext (the
STARTTLS command-injection class), structured replies kept across STARTTLS
(CVE-2021-3716).  Written from the spec for these tests only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import ssl
import struct
from pathlib import Path

from conformance import tlsutil
from conformance.wire import Cmd, HandshakeFlag, Info, Opt, Rep, ReplyFlag, ReplyType
from conformance.wire.constants import (
    IHAVEOPT,
    NBDMAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
)
from tests.broken_servers.toy_listener import ToyListener
from tests.broken_servers.toy_wire import ToyConnection

SIZE = 1 << 20


@dataclasses.dataclass
class Bugs:
    ignore_unknown_client_flags: bool = False
    answer_buffered_plaintext: bool = False  # the STARTTLS command-injection class
    keep_structured_across_starttls: bool = False  # CVE-2021-3716


class ToyServer(ToyListener):
    """FORCEDTLS toy NBD server on a Unix socket; one thread per connection."""

    export_name = ""
    tls = True

    def __init__(self, directory: Path, bugs: Bugs) -> None:
        self.bugs = bugs
        self.tls_dir = str(tlsutil.generate(directory / "tls").directory)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(
            f"{self.tls_dir}/server-cert.pem", f"{self.tls_dir}/server-key.pem"
        )
        super().__init__(str(directory / "toy.sock"))

    def serve(self, conn: socket.socket) -> None:
        conn.settimeout(3)
        session = _Session(self, conn)
        try:
            with contextlib.suppress(OSError, EOFError, ssl.SSLError):
                session.run()
        finally:
            session.sock.close()
            conn.close()


class _Session(ToyConnection):
    def __init__(self, server: ToyServer, conn: socket.socket) -> None:
        super().__init__(conn)
        self.server, self.bugs = server, server.bugs
        self.tls = self.structured = False

    def run(self) -> None:
        flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        self.sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags))
        (client_flags,) = struct.unpack(">I", self.recv(4))
        if client_flags & ~3 and not self.bugs.ignore_unknown_client_flags:
            return
        while True:
            magic, option, length = struct.unpack(">QII", self.recv(16))
            self.recv(length)  # option data: the toy never needs it
            if magic != IHAVEOPT:
                return
            if option == Opt.STARTTLS and not self.tls:
                self.reply(option, Rep.ACK)
                if self.bugs.answer_buffered_plaintext and self.buffer:
                    continue  # the next option is served from the plaintext buffer
                self.buffer = b""
                self.sock = self.server.context.wrap_socket(self.sock, server_side=True)
                self.server.track(self.sock)
                self.tls = True
                if not self.bugs.keep_structured_across_starttls:
                    self.structured = False
            elif option == Opt.STRUCTURED_REPLY and (
                self.tls or self.bugs.keep_structured_across_starttls
            ):
                self.structured = True
                self.reply(option, Rep.ACK)
            elif not self.tls:
                self.reply(option, Rep.ERR_TLS_REQD)
            elif option == Opt.GO:
                export = struct.pack(">HQH", Info.EXPORT, SIZE, 1)
                self.reply(option, Rep.INFO, export)
                self.reply(option, Rep.ACK)
                return self.transmission()
            elif option == Opt.LIST:
                self.reply(option, Rep.SERVER, b"\0\0\0\0")
                self.reply(option, Rep.ACK)
            else:
                self.reply(option, Rep.ERR_UNSUP)

    def transmission(self) -> None:
        while True:
            _, _, cmd, cookie, offset, length = struct.unpack(">IHHQQI", self.recv(28))
            if cmd == Cmd.DISC:
                return
            if self.structured:
                payload = struct.pack(">Q", offset) + bytes(length)
                header = struct.pack(
                    ">IHHQI",
                    STRUCTURED_REPLY_MAGIC,
                    ReplyFlag.DONE,
                    ReplyType.OFFSET_DATA,
                    cookie,
                    len(payload),
                )
                self.sock.sendall(header + payload)
            else:
                self.sock.sendall(
                    struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie) + bytes(length)
                )
