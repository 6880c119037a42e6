"""A toy NBD server in clear (NOTLS) whose bugs can be switched on one at a time.

For tests/test_wire_checks_can_fail.py: the raw-wire checks of the suite are
run against it, first without bugs (they must pass), then with one bug each
(exactly the checks guarding against it must fail).  It speaks fixed newstyle
with NBD_OPT_GO/INFO/LIST/ABORT/STRUCTURED_REPLY/SET_META_CONTEXT
(base:allocation only), and READ, WRITE, FLUSH, CACHE, BLOCK_STATUS and DISC
on a 1 MiB export in memory, with simple or structured replies.  It is
written from the spec for these tests only and shares nothing with the
reference server (which others are refactoring): a bug patched into it
would break with every refactoring.

Requests are served one batch at a time: everything the client sent and the
server could read at once, then the replies of the batch in one write.  That
is what lets ``disc_drops_requests_in_flight`` behave as servers that close
on NBD_CMD_DISC with replies still queued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import struct
import threading
from pathlib import Path

from conformance.wire import Cmd, Errno, HandshakeFlag, Info, Opt, Rep, ReplyFlag, ReplyType
from conformance.wire.constants import (
    IHAVEOPT,
    NBDMAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    TransmissionFlag,
)
from tests.broken_servers.toy_listener import ToyListener
from tests.broken_servers.toy_wire import ToyConnection, meta_context_query

SIZE = 1 << 20
EXPORT = "toy"
CONTEXT_ID = 7
KNOWN_FLAGS: dict[int, int] = {
    Cmd.READ: 0b100,
    Cmd.WRITE: 0b1,
    Cmd.FLUSH: 0,
    Cmd.CACHE: 0,
    Cmd.BLOCK_STATUS: 0b1000,
}


@dataclasses.dataclass
class Bugs:
    """One historical (or plausible) server bug per field."""

    truncate_cookies: bool = False  # replies carry the low 32 bits of the cookie only
    disc_drops_requests_in_flight: bool = False  # DISC closes before the batch is answered
    disc_keeps_connection: bool = False  # DISC is ignored: the connection stays open
    unknown_command_succeeds: bool = False
    ignore_unknown_flags: bool = False  # on every command, CACHE included
    extra_reply_flag: bool = False  # structured chunks carry flag bit 1
    error_chunk_twice: bool = False  # a failed READ gets two NBD_REPLY_TYPE_ERROR chunks
    simple_errors_under_structured: bool = False  # non-READ errors as simple replies
    unknown_info_fails: bool = False  # NBD_OPT_INFO/GO with unknown requests: ERR_UNSUP
    info_repeated: bool = False  # each requested information type once per request
    nul_terminated_strings: bool = False  # names sent with their C terminator
    list_context_ids: bool = False  # LIST_META_CONTEXT replies carry the real context ID
    tls_reqd_in_notls: bool = False  # STARTTLS answered NBD_REP_ERR_TLS_REQD
    errors_in_host_order: bool = False  # error fields little-endian (EINVAL as 0x16000000)
    hang_up_on_unknown_export: bool = False  # INFO/GO for another name: the connection closes
    hang_up_after_refusals: bool = False  # the third refused option closes the connection
    hang_up_when_idle: bool = False  # one second without a request closes the connection


class ToyServer(ToyListener):
    """Listens on a Unix socket in DIRECTORY; one thread per connection; close() stops all."""

    tls = False
    tls_dir = None
    export_name = EXPORT

    def __init__(self, directory: Path, bugs: Bugs) -> None:
        self.bugs = bugs
        self.data = bytearray(SIZE)
        self.lock = threading.Lock()
        super().__init__(str(directory / "toy-notls.sock"))

    def serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            with contextlib.suppress(OSError, EOFError, struct.error):
                _Session(self, conn).run()
        finally:
            conn.close()


class _Session(ToyConnection):
    def __init__(self, server: ToyServer, conn: socket.socket) -> None:
        super().__init__(conn)
        self.server, self.bugs = server, server.bugs
        self.structured = False
        self.contexts = False
        self.refusals = 0

    def string(self, text: str) -> bytes:
        return text.encode() + (b"\0" if self.bugs.nul_terminated_strings else b"")

    # -------------------------------------------------------------- handshake

    def reply(self, option: int, rep: int, data: bytes = b"") -> None:
        if rep & (1 << 31) and self.bugs.hang_up_after_refusals:
            self.refusals += 1
            if self.refusals == 3:
                raise EOFError("too many refusals")
        super().reply(option, rep, data)

    def run(self) -> None:
        flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        self.sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags))
        (client_flags,) = struct.unpack(">I", self.recv(4))
        if client_flags & ~3:
            return
        while True:
            magic, option, length = struct.unpack(">QII", self.recv(16))
            data = self.recv(length)
            if magic != IHAVEOPT:
                return
            if option == Opt.ABORT:
                self.reply(option, Rep.ACK)
                return
            if option in (Opt.GO, Opt.INFO):
                if self.info(option, data) and option == Opt.GO:
                    return self.transmission()
            elif option == Opt.LIST:
                name = self.string(EXPORT)
                self.reply(option, Rep.SERVER, struct.pack(">I", len(name)) + name)
                self.reply(option, Rep.ACK)
            elif option == Opt.STRUCTURED_REPLY:
                self.structured = self.structured or not data
                self.reply(option, Rep.ERR_INVALID if data else Rep.ACK)
            elif option in (Opt.SET_META_CONTEXT, Opt.LIST_META_CONTEXT):
                if self.structured:
                    self.meta_context(option, data)
                else:
                    self.reply(option, Rep.ERR_INVALID)
            elif option == Opt.STARTTLS:
                refusal = Rep.ERR_TLS_REQD if self.bugs.tls_reqd_in_notls else Rep.ERR_POLICY
                self.reply(option, refusal)
            else:
                self.reply(option, Rep.ERR_UNSUP)

    def info(self, option: int, data: bytes) -> bool:
        (name_length,) = struct.unpack_from(">I", data)
        name = data[4 : 4 + name_length].decode()
        (count,) = struct.unpack_from(">H", data, 4 + name_length)
        asked = list(struct.unpack_from(f">{count}H", data, 6 + name_length))
        if name not in ("", EXPORT):
            if self.bugs.hang_up_on_unknown_export:
                raise EOFError("unknown export")
            self.reply(option, Rep.ERR_UNKNOWN)
            return False
        if self.bugs.unknown_info_fails and any(i > Info.BLOCK_SIZE for i in asked):
            self.reply(option, Rep.ERR_UNSUP)
            return False
        flags = (
            TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_CACHE
        )
        if self.structured:
            flags |= TransmissionFlag.SEND_DF
        infos = {Info.EXPORT: struct.pack(">QH", SIZE, flags)}
        infos[Info.NAME] = self.string(EXPORT)
        infos[Info.BLOCK_SIZE] = struct.pack(">III", 1, 4096, 1 << 25)
        order = [Info.EXPORT, *asked]
        if not self.bugs.info_repeated:
            order = list(dict.fromkeys(order))
        for kind in order:
            if kind in infos:
                self.reply(option, Rep.INFO, struct.pack(">H", kind) + infos[kind])
        self.reply(option, Rep.ACK)
        return True

    def meta_context(self, option: int, data: bytes) -> None:
        _, queries = meta_context_query(data)
        wanted = not queries or any(q in (b"base:", b"base:allocation") for q in queries)
        if wanted:
            listed = option == Opt.LIST_META_CONTEXT and not self.bugs.list_context_ids
            context_id = 0 if listed else CONTEXT_ID
            name = self.string("base:allocation")
            self.reply(option, Rep.META_CONTEXT, struct.pack(">I", context_id) + name)
            if option == Opt.SET_META_CONTEXT:
                self.contexts = True
        self.reply(option, Rep.ACK)

    # ----------------------------------------------------------- transmission

    def transmission(self) -> None:
        if self.bugs.hang_up_when_idle:
            self.sock.settimeout(1.0)
        while True:
            if not self.buffer:
                self.fill()
            out: list[bytes] = []
            disc = False
            while len(self.buffer) >= 28 and not disc:
                magic, flags, cmd, cookie, offset, length = struct.unpack(
                    ">IHHQQI", self.buffer[:28]
                )
                payload_length = length if cmd == Cmd.WRITE else 0
                if len(self.buffer) < 28 + payload_length:
                    break
                payload = self.buffer[28 : 28 + payload_length]
                self.buffer = self.buffer[28 + payload_length :]
                if magic != REQUEST_MAGIC:
                    return
                if cmd == Cmd.DISC:
                    disc = True
                    break
                out.append(self.serve(flags, cmd, cookie, offset, length, payload))
            if disc and self.bugs.disc_drops_requests_in_flight:
                return
            if out:
                self.sock.sendall(b"".join(out))
            if disc and not self.bugs.disc_keeps_connection:
                return

    def serve(
        self, flags: int, cmd: int, cookie: int, offset: int, length: int, payload: bytes
    ) -> bytes:
        if self.bugs.truncate_cookies:
            cookie &= 0xFFFFFFFF
        known = KNOWN_FLAGS.get(cmd)
        if known is None:
            if self.bugs.unknown_command_succeeds:
                return self.simple(cookie, Errno.OK)
            return self.error(cmd, cookie, Errno.EINVAL)
        if flags & ~known and not self.bugs.ignore_unknown_flags:
            return self.error(cmd, cookie, Errno.EINVAL)
        end = offset + length
        if cmd in (Cmd.READ, Cmd.WRITE, Cmd.CACHE, Cmd.BLOCK_STATUS) and end > SIZE:
            return self.error(cmd, cookie, Errno.ENOSPC if cmd == Cmd.WRITE else Errno.EINVAL)
        if cmd == Cmd.READ:
            with self.server.lock:
                data = bytes(self.server.data[offset:end])
            if not self.structured:
                return self.simple(cookie, Errno.OK) + data
            return self.chunk(
                cookie, ReplyType.OFFSET_DATA, struct.pack(">Q", offset) + data, done=True
            )
        if cmd == Cmd.WRITE:
            with self.server.lock:
                self.server.data[offset:end] = payload
        if cmd == Cmd.BLOCK_STATUS:
            if not self.contexts:
                return self.error(cmd, cookie, Errno.EINVAL)
            body = struct.pack(">III", CONTEXT_ID, max(length, 1), 0)
            return self.chunk(cookie, ReplyType.BLOCK_STATUS, body, done=True)
        return self.simple(cookie, Errno.OK)

    def simple(self, cookie: int, error: int) -> bytes:
        return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, self.error_field(error), cookie)

    def error_field(self, error: int) -> int:
        if self.bugs.errors_in_host_order:
            return int.from_bytes(error.to_bytes(4, "little"), "big")
        return error

    def chunk(self, cookie: int, kind: int, payload: bytes, *, done: bool) -> bytes:
        flags = ReplyFlag.DONE if done else 0
        if self.bugs.extra_reply_flag:
            flags |= 2
        header = struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload))
        return header + payload

    def error(self, cmd: int, cookie: int, error: int) -> bytes:
        if not self.structured or (cmd != Cmd.READ and self.bugs.simple_errors_under_structured):
            return self.simple(cookie, error)
        message = b"toy error"
        body = struct.pack(">IH", self.error_field(error), len(message)) + message
        if self.bugs.error_chunk_twice:
            return self.chunk(cookie, ReplyType.ERROR, body, done=False) + self.chunk(
                cookie, ReplyType.ERROR, body, done=True
            )
        return self.chunk(cookie, ReplyType.ERROR, body, done=True)
