"""A blocking raw-wire NBD client that can say anything, including lies.

libnbd sends only what a correct client sends; the conformance suite must also
send unknown options, payloads whose length field lies, bad magics, oversized
names, STARTTLS at any point.  Every socket operation has a timeout; a server
that stalls makes the check fail with a message, never hang.

The client tracks just enough negotiated state (structured replies, extended
headers, TLS) to frame the server's replies; it never refuses to send, with
one exception: a request that changes data (write, trim, write-zeroes) goes
only where the connection's :class:`~conformance.guard.WritePermission`
allows it, and is refused before anything is sent otherwise.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import ssl
import struct
import time
from typing import Protocol

from conformance import evidence
from conformance.guard import UNRESTRICTED, WRITE_COMMANDS, WritePermission

from . import messages as m
from .constants import (
    EXPORT_NAME_ZEROES,
    EXTENDED_REPLY_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    HandshakeFlag,
    Info,
    Opt,
    ReplyFlag,
    ReplyType,
)
from .results import DisconnectResult, ExportNameResult, OptionResult, Reply

# Replies larger than this are treated as a protocol violation rather than
# read: a broken server must not make the suite allocate without bound.
MAX_OPTION_REPLY = 1 << 24
MAX_CHUNK_PAYLOAD = (1 << 26) + 4096


class Disconnected(Exception):
    """The server closed (or reset) the connection."""


class _HasOpenSocket(Protocol):
    def open_socket(self, timeout: float = ...) -> socket.socket: ...


class WireClient:
    """One connection to an NBD server, driven message by message."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float = 10.0,
        permission: WritePermission = UNRESTRICTED,
    ) -> None:
        self.sock: socket.socket = sock
        self.timeout = timeout
        self.permission = permission
        # In the transmission phase, raw bytes sent are checked for write requests.
        self.transmitting = False
        sock.settimeout(timeout)
        self.greeting: m.Greeting | None = None
        self.client_flags: int | None = None
        self.structured = False
        self.extended = False
        self.tls = False
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        # Every line also goes to the running check's evidence (conformance/evidence.py).
        self.name = evidence.connection("wire")
        self._read_lengths: dict[int, int] = {}
        self._stash: dict[int, list[m.SimpleReply | m.Chunk]] = {}
        self._next_cookie = 1

    @classmethod
    def connect(cls, server: _HasOpenSocket, *, timeout: float = 10.0) -> WireClient:
        permission = getattr(server, "write_permission", UNRESTRICTED)
        return cls(server.open_socket(timeout=timeout), timeout=timeout, permission=permission)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def note(self, line: str, raw: bytes | None = None) -> None:
        """Log one decoded frame (with its header bytes in hex, when given)."""
        if raw is not None:
            line = f"{line} [{bytes(raw[:32]).hex()}{'...' if len(raw) > 32 else ''}]"
        self.log.append(line)
        evidence.record(self.name, line)

    def transcript(self) -> str:
        """The last messages exchanged, Autobahn-style, for failure messages."""
        return "\n".join(self.log)

    # ------------------------------------------------------------ raw bytes

    def send(self, data: bytes) -> None:
        if self.transmitting:
            self.permission.require_for_bytes(data)
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise Disconnected(f"server closed the connection while we sent: {exc}") from None

    def recv_exactly(self, n: int, what: str = "data") -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                piece = self.sock.recv(min(n - len(buf), 1 << 20))
            except TimeoutError:
                raise TimeoutError(
                    f"no {what} from the server within {self.timeout}s "
                    f"(received {len(buf)} of {n} bytes)"
                ) from None
            except (ConnectionResetError, ssl.SSLError) as exc:
                raise Disconnected(f"connection lost reading {what}: {exc}") from None
            if not piece:
                raise Disconnected(
                    f"server closed the connection reading {what} ({len(buf)} of {n} bytes)"
                )
            buf += piece
        return bytes(buf)

    def expect_disconnect(
        self, timeout: float = 5.0, *, stop_on_data: bool = False
    ) -> DisconnectResult:
        """Wait up to *timeout* seconds for the server to close; collect what it sends.

        With *stop_on_data*, return as soon as the server sends anything (it answered
        rather than closing)."""
        start = time.monotonic()
        deadline = start + timeout
        data = bytearray()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return DisconnectResult(False, bytes(data), time.monotonic() - start)
                self.sock.settimeout(left)
                try:
                    piece = self.sock.recv(65536)
                except TimeoutError:
                    continue
                except (ConnectionResetError, ssl.SSLError, OSError):
                    piece = b""
                if not piece:
                    self.note("S: <connection closed>")
                    return DisconnectResult(True, bytes(data), time.monotonic() - start)
                data += piece[: max(0, (1 << 20) - len(data))]
                if stop_on_data:
                    return DisconnectResult(False, bytes(data), time.monotonic() - start)
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(self.timeout)

    # ------------------------------------------------------------ handshake

    def read_greeting(self) -> m.Greeting:
        self.greeting = m.unpack_greeting(self.recv_exactly(m.GREETING.size, "greeting"))
        g = self.greeting
        self.note(f"S: greeting {g.magic:#x} {g.option_magic:#x} flags={g.flags!r}")
        return g

    def send_client_flags(self, flags: int) -> None:
        self.client_flags = flags
        self.note(f"C: client flags {flags:#x}")
        self.send(m.pack_client_flags(flags))

    def negotiate(self, flags: int | None = None) -> m.Greeting:
        """Greeting, then client flags: FIXED_NEWSTYLE, and NO_ZEROES when offered."""
        g = self.read_greeting()
        if g.magic != NBDMAGIC or g.option_magic != IHAVEOPT:
            raise m.ProtocolViolation(f"bad greeting magics {g.magic:#x} {g.option_magic:#x}")
        if flags is None:
            flags = ClientFlag.C_FIXED_NEWSTYLE
            if g.flags & HandshakeFlag.NO_ZEROES:
                flags |= ClientFlag.C_NO_ZEROES
        self.send_client_flags(int(flags))
        return g

    def send_option(
        self, option: int, data: bytes = b"", *, length: int | None = None, magic: int = IHAVEOPT
    ) -> None:
        claimed = len(data) if length is None else length
        packed = m.pack_option(option, data, length=length, magic=magic)
        self.note(f"C: option {Opt(option).name} length={claimed} ({len(data)} sent)", packed)
        self.send(packed)

    def recv_option_reply(self) -> m.OptionReply:
        header = self.recv_exactly(m.OPTION_REPLY_HEADER.size, "option reply")
        magic, option, rep, length = m.unpack_option_reply_header(header)
        self.note(f"S: option reply {option.name} {rep.name} length={length}", header)
        if magic != OPTION_REPLY_MAGIC:
            raise m.ProtocolViolation(f"option reply magic {magic:#x}, expected the spec's")
        if length > MAX_OPTION_REPLY:
            raise m.ProtocolViolation(f"option reply length {length} is implausibly large")
        return m.OptionReply(magic, option, rep, self.recv_exactly(length, "option reply data"))

    def recv_option_result(self) -> OptionResult:
        replies = [self.recv_option_reply()]
        while not replies[-1].is_final:
            replies.append(self.recv_option_reply())
        return OptionResult(replies)

    def option(self, option: int, data: bytes = b"", *, length: int | None = None) -> OptionResult:
        """Send one option and read every reply up to the final one."""
        self.send_option(option, data, length=length)
        result = self.recv_option_result()
        if option == Opt.GO and result.ok:
            self.transmitting = True
        return result

    def export_name(self, name: bytes) -> ExportNameResult:
        """NBD_OPT_EXPORT_NAME: enter transmission, or raise Disconnected."""
        self.send_option(Opt.EXPORT_NAME, name)
        export = m.unpack_export_name_reply(self.recv_exactly(10, "export info"))
        zeroes = b""
        if not (self.client_flags or 0) & ClientFlag.C_NO_ZEROES:
            zeroes = self.recv_exactly(EXPORT_NAME_ZEROES, "reserved zeroes")
        self.note(f"S: export size={export.size} flags={export.flags!r}")
        self.transmitting = True
        return ExportNameResult(export, zeroes)

    def info(self, name: bytes, infos: tuple[int, ...] = (Info.BLOCK_SIZE,)) -> OptionResult:
        return self.option(Opt.INFO, m.pack_name_and_infos(name, infos))

    def go(self, name: bytes, infos: tuple[int, ...] = (Info.BLOCK_SIZE,)) -> OptionResult:
        return self.option(Opt.GO, m.pack_name_and_infos(name, infos))

    def structured_reply(self) -> OptionResult:
        result = self.option(Opt.STRUCTURED_REPLY)
        self.structured = self.structured or result.ok
        return result

    def extended_headers(self) -> OptionResult:
        result = self.option(Opt.EXTENDED_HEADERS)
        self.extended = self.extended or result.ok
        return result

    def list_meta_context(self, name: bytes, queries: tuple[bytes, ...]) -> OptionResult:
        return self.option(Opt.LIST_META_CONTEXT, m.pack_meta_context_query(name, queries))

    def set_meta_context(self, name: bytes, queries: tuple[bytes, ...]) -> OptionResult:
        return self.option(Opt.SET_META_CONTEXT, m.pack_meta_context_query(name, queries))

    def starttls(self, context: ssl.SSLContext) -> OptionResult:
        """NBD_OPT_STARTTLS; on NBD_REP_ACK, the TLS handshake (raises on failure)."""
        result = self.option(Opt.STARTTLS)
        if result.ok:
            self.upgrade_tls(context)
        return result

    def upgrade_tls(self, context: ssl.SSLContext) -> None:
        """Start TLS on the socket; no negotiated state survives (TLS support)."""
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        self.sock.settimeout(self.timeout)
        self.tls = True
        self.structured = self.extended = False
        self.note(f"C/S: TLS established ({self.sock.version()})")

    def abort(self) -> OptionResult | None:
        """NBD_OPT_ABORT; ``None`` if the server closed without replying (allowed)."""
        try:
            return self.option(Opt.ABORT)
        except Disconnected:
            return None

    def open_export(
        self,
        name: bytes,
        *,
        tls: ssl.SSLContext | None = None,
        structured: bool = False,
        extended: bool = False,
        meta_contexts: tuple[bytes, ...] = (),
        infos: tuple[int, ...] = (Info.BLOCK_SIZE,),
    ) -> OptionResult:
        """A well-behaved handshake ending in NBD_OPT_GO; raises unless it succeeds."""
        self.negotiate()
        if tls is not None:
            self._require(self.starttls(tls), Opt.STARTTLS)
        if extended:
            self._require(self.extended_headers(), Opt.EXTENDED_HEADERS)
        if structured:
            self._require(self.structured_reply(), Opt.STRUCTURED_REPLY)
        if meta_contexts:
            self._require(self.set_meta_context(name, meta_contexts), Opt.SET_META_CONTEXT)
        return self._require(self.go(name, infos), Opt.GO)

    @staticmethod
    def _require(result: OptionResult, option: Opt) -> OptionResult:
        if not result.ok:
            raise m.ProtocolViolation(
                f"{option.name}: expected NBD_REP_ACK, actual {result.describe()}"
            )
        return result

    # --------------------------------------------------------- transmission

    def send_request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        cookie: int | None = None,
        payload: bytes = b"",
        extended: bool | None = None,
        magic: int | None = None,
    ) -> int:
        """Send one request exactly as told; returns its cookie."""
        if cmd in WRITE_COMMANDS:
            self.permission.require(WRITE_COMMANDS[cmd])
        if cookie is None:
            cookie = self._next_cookie
            self._next_cookie += 1
        use_extended = self.extended if extended is None else extended
        pack = m.pack_extended_request if use_extended else m.pack_request
        kwargs = {} if magic is None else {"magic": magic}
        data = pack(cmd, offset, length, flags=flags, cookie=cookie, payload=payload, **kwargs)
        if cmd == Cmd.READ:
            self._read_lengths[cookie] = length
        self.note(
            f"C: {Cmd(cmd).name} flags={flags:#x} cookie={cookie:#x} offset={offset} "
            f"length={length} payload={len(payload)}{' (extended)' if use_extended else ''}",
            data,
        )
        self.send(data)
        return cookie

    def recv_message(self) -> m.SimpleReply | m.Chunk:
        """One simple reply or reply chunk, whichever the server sends next."""
        (magic,) = m.MAGIC32.unpack(self.recv_exactly(4, "reply magic"))
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exactly(12, "simple reply"))
            length = self._read_lengths.pop(cookie, 0) if error == 0 else 0
            self._read_lengths.pop(cookie, None)
            data = self.recv_exactly(length, "read data") if length else b""
            self.note(f"S: simple reply cookie={cookie:#x} error={Errno(error).name}")
            return m.SimpleReply(Errno(error), cookie, data)
        if magic == STRUCTURED_REPLY_MAGIC:
            flags, rtype, cookie, length = m.STRUCTURED_REPLY_TAIL.unpack(
                self.recv_exactly(m.STRUCTURED_REPLY_TAIL.size, "structured reply")
            )
            offset = None
        elif magic == EXTENDED_REPLY_MAGIC:
            flags, rtype, cookie, offset, length = m.EXTENDED_REPLY_TAIL.unpack(
                self.recv_exactly(m.EXTENDED_REPLY_TAIL.size, "extended reply")
            )
        else:
            raise m.ProtocolViolation(f"unknown reply magic {magic:#x}")
        if length > MAX_CHUNK_PAYLOAD:
            raise m.ProtocolViolation(f"reply chunk length {length} is implausibly large")
        payload = self.recv_exactly(length, "chunk payload")
        chunk = m.Chunk(ReplyFlag(flags), ReplyType(rtype), cookie, payload, offset, magic)
        if chunk.done:
            self._read_lengths.pop(cookie, None)
        self.note(
            f"S: chunk {chunk.type.name} flags={flags:#x} cookie={cookie:#x} length={length}"
            f"{'' if offset is None else f' offset={offset}'} {evidence.summarise(payload)}"
        )
        return chunk

    def reply(self, cookie: int) -> Reply:
        """Every message for *cookie* up to the final one; others are kept for later."""
        reply = Reply(cookie, self._stash.pop(cookie, []))
        while not self._complete(reply):
            msg = self.recv_message()
            if msg.cookie == cookie:
                reply.messages.append(msg)
            else:
                self._stash.setdefault(msg.cookie, []).append(msg)
        return reply

    def stray(self, cookie: int) -> list[m.SimpleReply | m.Chunk]:
        """Messages for *cookie* received while waiting for other replies (and not yet taken)."""
        return list(self._stash.get(cookie, []))

    @staticmethod
    def _complete(reply: Reply) -> bool:
        return bool(reply.messages) and (
            isinstance(reply.messages[-1], m.SimpleReply) or reply.messages[-1].done
        )

    def request(self, cmd: int, offset: int = 0, length: int = 0, **kwargs: object) -> Reply:
        return self.reply(self.send_request(cmd, offset, length, **kwargs))  # type: ignore[arg-type]

    def read(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.request(Cmd.READ, offset, length, flags=flags)

    def write(self, offset: int, data: bytes, flags: int = 0) -> Reply:
        if self.extended:
            flags |= CmdFlag.PAYLOAD_LEN
        return self.request(Cmd.WRITE, offset, len(data), flags=flags, payload=data)

    def block_status(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.request(Cmd.BLOCK_STATUS, offset, length, flags=flags)

    def disconnect(self) -> None:
        """NBD_CMD_DISC (no reply), then close our end."""
        with contextlib.suppress(Disconnected, OSError):
            self.send_request(Cmd.DISC)
        self.close()
