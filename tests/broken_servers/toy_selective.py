"""A toy SELECTIVETLS NBD server whose bugs can be switched on one at a time.

For tests/test_selective_checks_can_fail.py: the checks of
conformance/test_selective_tls.py run against it, first without bugs (they
must pass), then with one bug each (exactly the checks guarding against it
must fail).  It serves the default export ("") to anyone and
``TLS_ONLY_EXPORT`` only over TLS, hides unknown exports before TLS
(NBD_REP_ERR_TLS_REQD), and in transmission answers READ (simple replies, all
zeroes) and DISC.  ``mode`` "forced" makes every export TLS-only (FORCEDTLS),
"notls" offers no TLS.  Written from the spec for these tests only; it shares
nothing with the reference server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import ssl
import struct
from pathlib import Path

from conformance import tlsutil
from conformance.servers.base import DEFAULT_SIZE
from conformance.test_selective_tls import TLS_ONLY_EXPORT
from conformance.wire import Cmd, HandshakeFlag, Info, Opt, Rep
from conformance.wire.constants import (
    IHAVEOPT,
    NBDMAGIC,
    SIMPLE_REPLY_MAGIC,
)
from tests.broken_servers.toy_listener import ToyListener
from tests.broken_servers.toy_wire import ToyConnection

PLAIN = ""
FIXED_NEWSTYLE = 1
NO_ZEROES = 2
HAS_FLAGS = 1


@dataclasses.dataclass
class Bugs:
    """One plausible SELECTIVETLS bug per field."""

    starttls_only_first: bool = False  # STARTTLS after any other option: ERR_POLICY
    second_starttls_unsupported: bool = False  # STARTTLS over TLS: ERR_UNSUP, not ERR_INVALID
    tls_only_go_unknown: bool = False  # GO on the TLS-only export before TLS: ERR_UNKNOWN
    export_name_ignores_tls: bool = False  # EXPORT_NAME serves the TLS-only export in clear
    tls_reqd_for_meta_context: bool = False  # metadata-context options on it: ERR_TLS_REQD
    tls_reqd_for_unknown_over_tls: bool = False  # unknown exports still hidden over TLS
    info_before_tls_reqd: bool = False  # NBD_REP_INFO sent before ERR_TLS_REQD
    forced_after_tls_only_asked: bool = False  # asking for it turns the connection FORCEDTLS
    refuse_non_fixed_with_tls: bool = False  # with TLS offered, non-fixed clients are dropped
    tls_reqd_to_non_fixed: bool = False  # FORCEDTLS answers non-fixed clients ERR_TLS_REQD


class ToySelective(ToyListener):
    """Listens on a Unix socket in DIRECTORY; one thread per connection; close() stops all."""

    tls = False  # clients reach the plain export without TLS
    export_name = PLAIN

    def __init__(self, directory: Path, bugs: Bugs, mode: str = "selective") -> None:
        self.bugs, self.mode = bugs, mode
        credentials = directory / "tls"
        if not (credentials / "server-cert.pem").exists():
            tlsutil.generate(credentials)
        self.tls_dir = str(credentials)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(
            f"{self.tls_dir}/server-cert.pem", f"{self.tls_dir}/server-key.pem"
        )
        super().__init__(str(directory / f"toy-{mode}.sock"))

    def serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        session = _Session(self, conn)
        try:
            with contextlib.suppress(OSError, EOFError, struct.error, ssl.SSLError):
                session.run()
        finally:
            with contextlib.suppress(OSError):
                session.sock.close()
            conn.close()


class _Session(ToyConnection):
    def __init__(self, server: ToySelective, conn: socket.socket) -> None:
        super().__init__(conn)
        self.server, self.bugs = server, server.bugs
        self.mode = server.mode
        self.tls = self.structured = False
        self.options_seen = 0
        self.zeroes = True

    def usable(self, name: str) -> bool:
        if name not in (PLAIN, TLS_ONLY_EXPORT):
            return False
        if self.tls or self.mode == "notls":
            return True
        return name == PLAIN and self.mode in ("selective", "notls-client")

    def run(self) -> None:
        flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        self.sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags))
        (client_flags,) = struct.unpack(">I", self.recv(4))
        if client_flags & ~3:
            return
        self.zeroes = not client_flags & NO_ZEROES
        if not client_flags & FIXED_NEWSTYLE:
            if self.mode == "forced" and not self.bugs.tls_reqd_to_non_fixed:
                return  # nothing to serve in NOTLS mode
            if self.mode == "selective" and self.bugs.refuse_non_fixed_with_tls:
                return
            if self.mode != "forced":
                self.mode = "notls-client"  # NOTLS: plain exports only, no TLS
        while True:
            magic, option, length = struct.unpack(">QII", self.recv(16))
            data = self.recv(length)
            if magic != IHAVEOPT:
                return
            self.options_seen += 1
            if option == Opt.ABORT:
                self.reply(option, Rep.ACK)
                return
            if option == Opt.EXPORT_NAME:
                return self.export_name(data.decode())
            if self.mode in ("forced", "forced-after") and not self.tls and option != Opt.STARTTLS:
                self.reply(option, Rep.ERR_TLS_REQD)
            elif option == Opt.STARTTLS:
                self.starttls(option)
            elif option in (Opt.INFO, Opt.GO):
                if self.info(option, data) and option == Opt.GO:
                    return self.transmission()
            elif option == Opt.LIST:
                for name in (PLAIN, TLS_ONLY_EXPORT):
                    if self.usable(name):
                        encoded = name.encode()
                        self.reply(option, Rep.SERVER, struct.pack(">I", len(encoded)) + encoded)
                self.reply(option, Rep.ACK)
            elif option == Opt.STRUCTURED_REPLY:
                self.structured = True
                self.reply(option, Rep.ACK)
            elif option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
                self.meta_context(option, data)
            else:
                self.reply(option, Rep.ERR_UNSUP)

    def starttls(self, option: int) -> None:
        if self.tls:
            refusal = Rep.ERR_UNSUP if self.bugs.second_starttls_unsupported else Rep.ERR_INVALID
            self.reply(option, refusal)
        elif self.mode in ("notls", "notls-client") or (
            self.bugs.starttls_only_first and self.options_seen > 1
        ):
            self.reply(option, Rep.ERR_POLICY)
        else:
            self.reply(option, Rep.ACK)
            self.buffer = b""
            self.sock = self.server.context.wrap_socket(self.sock, server_side=True)
            self.tls, self.structured = True, False
            if self.mode == "forced-after":
                self.mode = "selective"

    def info(self, option: int, data: bytes) -> bool:
        (name_length,) = struct.unpack_from(">I", data)
        name = data[4 : 4 + name_length].decode()
        if name == TLS_ONLY_EXPORT and self.bugs.forced_after_tls_only_asked and not self.tls:
            self.mode = "forced-after"  # from the next option on
        export = struct.pack(">HQH", Info.EXPORT, DEFAULT_SIZE, HAS_FLAGS)
        if not self.usable(name):
            known = name in (PLAIN, TLS_ONLY_EXPORT)
            if self.mode in ("selective", "forced-after") and not self.tls:
                if name == TLS_ONLY_EXPORT and option == Opt.GO and self.bugs.tls_only_go_unknown:
                    self.reply(option, Rep.ERR_UNKNOWN)
                    return False
                if known and self.bugs.info_before_tls_reqd:
                    self.reply(option, Rep.INFO, export)
                self.reply(option, Rep.ERR_TLS_REQD)  # TLS-only, or hidden
            elif not known and self.tls and self.bugs.tls_reqd_for_unknown_over_tls:
                self.reply(option, Rep.ERR_TLS_REQD)
            else:
                self.reply(option, Rep.ERR_UNKNOWN)
            return False
        self.reply(option, Rep.INFO, export)
        self.reply(option, Rep.ACK)
        return True

    def meta_context(self, option: int, data: bytes) -> None:
        (name_length,) = struct.unpack_from(">I", data)
        name = data[4 : 4 + name_length].decode()
        if not self.usable(name):
            if name == TLS_ONLY_EXPORT and self.bugs.tls_reqd_for_meta_context:
                self.reply(option, Rep.ERR_TLS_REQD)
            else:
                self.reply(option, Rep.ERR_UNKNOWN)
        elif option == Opt.SET_META_CONTEXT and not self.structured:
            self.reply(option, Rep.ERR_INVALID)
        else:
            context = b"base:allocation"
            self.reply(option, Rep.META_CONTEXT, struct.pack(">I", 1) + context)
            self.reply(option, Rep.ACK)

    def export_name(self, name: str) -> None:
        served = self.usable(name) or (
            self.bugs.export_name_ignores_tls and name == TLS_ONLY_EXPORT and self.mode != "forced"
        )
        if not served:
            return
        reply = struct.pack(">QH", DEFAULT_SIZE, HAS_FLAGS)
        self.sock.sendall(reply + (bytes(124) if self.zeroes else b""))
        self.transmission()

    def transmission(self) -> None:
        while True:
            _, _, cmd, cookie, _, length = struct.unpack(">IHHQQI", self.recv(28))
            if cmd == Cmd.DISC:
                return
            data = bytes(length) if cmd == Cmd.READ else b""
            self.sock.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie) + data)
