"""A toy NBD server offering a metadata context with 64-bit status, with switchable bugs.

For tests/test_wide_checks_can_fail.py: the checks of
conformance/test_wide_contexts.py run against it, first without bugs (they
must pass, whichever of the two answers the spec allows SET_META_CONTEXT to
give), then with one bug each (exactly the checks guarding against it must
fail).  It offers ``base:allocation`` and ``x-toy:wide`` (its status "needs
64 bits") on a 1 MiB export with no data, and speaks just what those checks
send: fixed newstyle, STRUCTURED_REPLY, EXTENDED_HEADERS,
LIST/SET_META_CONTEXT, GO, ABORT; then BLOCK_STATUS and DISC.  Written from
the spec for these tests only; it shares nothing with the reference server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import struct
from pathlib import Path

from conformance.wire import Cmd, HandshakeFlag, Info, Opt, Rep, ReplyFlag, ReplyType
from conformance.wire.constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    REQUEST_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    TransmissionFlag,
)
from tests.broken_servers.toy_listener import ToyListener
from tests.broken_servers.toy_wire import ToyConnection, meta_context_query

SIZE = 1 << 20
EXPORT = "toy"
WIDE = b"x-toy:wide"
BASE = b"base:allocation"
CONTEXT_IDS = {BASE: 1, WIDE: 2}
HOLE = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO: the export holds no data


@dataclasses.dataclass
class Behaviour:
    """What the toy does; every field but ``refuse_set`` is a bug."""

    # Not a bug: SET_META_CONTEXT of the wide context without extended headers
    # fails with NBD_REP_ERR_EXT_HEADER_REQD instead of omitting it.
    refuse_set: bool = False
    wide_selected_without_extended: bool = False  # SET replies its ID all the same
    set_fails_invalid: bool = False  # ... or fails with NBD_REP_ERR_INVALID
    set_drops_everything: bool = False  # ... or omits base:allocation with it
    list_ends_with_ack: bool = False  # LIST names it, then a plain NBD_REP_ACK
    list_refused_with_extended: bool = False  # EXT_HEADER_REQD even after EXTENDED_HEADERS
    compact_chunks_when_extended: bool = False  # BLOCK_STATUS in 32-bit chunks all the same


class ToyWide(ToyListener):
    """Listens on a Unix socket in DIRECTORY; one thread per connection; close() stops all."""

    tls = False
    tls_dir = None
    export_name = EXPORT

    def __init__(self, directory: Path, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        super().__init__(str(directory / "toy-wide.sock"))

    def serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            with contextlib.suppress(OSError, EOFError, struct.error):
                _Session(self.behaviour, conn).run()
        finally:
            conn.close()


class _Session(ToyConnection):
    def __init__(self, behaviour: Behaviour, conn: socket.socket) -> None:
        super().__init__(conn)
        self.bugs = behaviour
        self.structured = self.extended = False
        self.selected: list[bytes] = []

    def run(self) -> None:
        flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        self.sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags))
        self.recv(4)
        while True:
            magic, option, length = struct.unpack(">QII", self.recv(16))
            data = self.recv(length)
            if magic != IHAVEOPT or option == Opt.ABORT:
                return
            if option == Opt.STRUCTURED_REPLY:
                self.structured = True
                self.reply(option, Rep.ACK)
            elif option == Opt.EXTENDED_HEADERS:
                self.extended = True
                self.reply(option, Rep.ACK)
            elif option in (Opt.SET_META_CONTEXT, Opt.LIST_META_CONTEXT):
                self.meta_context(option, data)
            elif option == Opt.GO:
                tx_flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_DF
                self.reply(option, Rep.INFO, struct.pack(">HQH", Info.EXPORT, SIZE, tx_flags))
                self.reply(option, Rep.ACK)
                return self.transmission()
            else:
                self.reply(option, Rep.ERR_UNSUP)

    def meta_context(self, option: int, data: bytes) -> None:
        _, queries = meta_context_query(data)
        setting = option == Opt.SET_META_CONTEXT
        if setting:
            self.selected = []
            chosen = [c for c in (BASE, WIDE) if c in queries]
        else:
            chosen = [c for c in (BASE, WIDE) if not queries or c in queries]
        held_back = WIDE in chosen and not self.extended
        if setting and held_back and not self.bugs.wide_selected_without_extended:
            if self.bugs.refuse_set:
                return self.reply(option, Rep.ERR_EXT_HEADER_REQD)
            if self.bugs.set_fails_invalid:
                return self.reply(option, Rep.ERR_INVALID)
            chosen = [] if self.bugs.set_drops_everything else [c for c in chosen if c != WIDE]
        for name in chosen:
            context_id = CONTEXT_IDS[name] if setting else 0
            self.reply(option, Rep.META_CONTEXT, struct.pack(">I", context_id) + name)
        if setting:
            self.selected = chosen
        elif (held_back and not self.bugs.list_ends_with_ack) or (
            WIDE in chosen and self.bugs.list_refused_with_extended
        ):
            return self.reply(option, Rep.ERR_EXT_HEADER_REQD)
        self.reply(option, Rep.ACK)

    def transmission(self) -> None:
        header = ">IHHQQQ" if self.extended else ">IHHQQI"
        size = struct.calcsize(header)
        while True:
            magic, _flags, cmd, cookie, offset, length = struct.unpack(header, self.recv(size))
            if magic not in (REQUEST_MAGIC, EXTENDED_REQUEST_MAGIC) or cmd != Cmd.BLOCK_STATUS:
                return
            length = min(length, SIZE - offset)
            chunks = []
            for n, name in enumerate(self.selected):
                status = SIZE if name == WIDE else HOLE
                done = ReplyFlag.DONE if n == len(self.selected) - 1 else 0
                if self.extended and not self.bugs.compact_chunks_when_extended:
                    body = struct.pack(">IIQQ", CONTEXT_IDS[name], 1, length, status)
                    head = struct.pack(
                        ">IHHQQQ", EXTENDED_REPLY_MAGIC, done, ReplyType.BLOCK_STATUS_EXT,
                        cookie, offset, len(body),
                    )  # fmt: skip
                else:
                    body = struct.pack(">III", CONTEXT_IDS[name], length, status & 0xFFFFFFFF)
                    head = struct.pack(
                        ">IHHQI", STRUCTURED_REPLY_MAGIC, done, ReplyType.BLOCK_STATUS,
                        cookie, len(body),
                    )  # fmt: skip
                chunks.append(head + body)
            self.sock.sendall(b"".join(chunks))
