"""Unit tests of the conformance suite's raw-wire client (conformance/wire).

The pure layouts are tested against hand-written bytes from the spec; the
socket client is tested against qemu-nbd, started here by PID on a Unix socket
in a temporary directory (the suite's own fixtures are not used: these tests
must hold even when the fixtures are broken).
"""

from __future__ import annotations

import shutil
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from conformance import tlsutil
from conformance.servers.peers import ServeOptions, qemu_nbd_argv
from conformance.servers.process import ServerProcess
from conformance.spec import SpecViolation
from conformance.wire import (
    AllocationState,
    ClientFlag,
    Cmd,
    CmdFlag,
    Disconnected,
    Errno,
    HandshakeFlag,
    Info,
    Opt,
    ProtocolViolation,
    Rep,
    Reply,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
    WireClient,
    session,
)
from conformance.wire import messages as m
from conformance.wire.constants import IHAVEOPT, NBDMAGIC, STRUCTURED_REPLY_MAGIC

SIZE = 4 * 1024 * 1024

# ------------------------------------------------------------------ layouts


def test_option_header_can_lie_about_its_length() -> None:
    data = m.pack_option(Opt.GO, b"abc", length=0xFFFFFFFF)
    assert data == struct.pack(">QII", IHAVEOPT, 7, 0xFFFFFFFF) + b"abc"


def test_name_and_infos_layout() -> None:
    data = m.pack_name_and_infos(b"exp", (Info.NAME, Info.BLOCK_SIZE))
    assert data == b"\0\0\0\x03exp\0\x02\0\x01\0\x03"
    assert m.pack_name_and_infos(b"", (), name_length=9) == b"\0\0\0\x09\0\0"


def test_meta_context_query_layout() -> None:
    data = m.pack_meta_context_query(b"e", (b"base:",))
    assert data == b"\0\0\0\x01e\0\0\0\x01\0\0\0\x05base:"


def test_requests_compact_and_extended() -> None:
    compact = m.pack_request(Cmd.READ, 512, 4096, flags=CmdFlag.DF, cookie=7)
    assert len(compact) == 28
    assert compact[:4] == b"\x25\x60\x95\x13"
    extended = m.pack_extended_request(Cmd.WRITE, 0, 3, flags=CmdFlag.PAYLOAD_LEN, payload=b"xyz")
    assert len(extended) == 32 + 3
    assert extended[:4] == b"\x21\xe4\x1c\x71"
    assert struct.unpack(">Q", extended[24:32]) == (3,)


def test_unknown_values_from_the_wire_are_tolerated() -> None:
    assert Opt(0x4242).name == "UNKNOWN_0x4242"
    assert Rep(2**31 + 77).is_error
    assert not Rep(Rep.INFO).is_error
    assert ReplyType(0x8077).is_error
    assert HandshakeFlag(0x8003) & HandshakeFlag.NO_ZEROES


def test_info_lengths_are_checked() -> None:
    export = m.unpack_info(struct.pack(">HQH", Info.EXPORT, SIZE, 1))
    assert export.value == m.ExportInfo(SIZE, TransmissionFlag.HAS_FLAGS)
    block = m.unpack_info(struct.pack(">HIII", Info.BLOCK_SIZE, 1, 4096, 1 << 25))
    assert block.value == m.BlockSize(1, 4096, 1 << 25)
    with pytest.raises(ProtocolViolation, match="expected 12"):
        m.unpack_info(struct.pack(">HQ", Info.EXPORT, SIZE))
    assert m.unpack_info(struct.pack(">H", Info.NAME) + b"n").value == "n"


def _chunk(rtype: int, payload: bytes, flags: int = 0, cookie: int = 1) -> m.Chunk:
    return m.Chunk(ReplyFlag(flags), ReplyType(rtype), cookie, payload)


def test_chunk_payloads_are_parsed_by_type() -> None:
    assert m.parse_chunk(_chunk(ReplyType.NONE, b"", 1)) is None
    data = m.parse_chunk(_chunk(ReplyType.OFFSET_DATA, struct.pack(">Q", 8) + b"ab"))
    assert data == m.OffsetData(8, b"ab")
    hole = m.parse_chunk(_chunk(ReplyType.OFFSET_HOLE, struct.pack(">QI", 0, 512)))
    assert hole == m.OffsetHole(0, 512)
    status = m.parse_chunk(_chunk(ReplyType.BLOCK_STATUS, struct.pack(">IIIII", 3, 10, 1, 6, 2)))
    assert status == m.BlockStatus(3, [(10, 1), (6, 2)])
    ext = m.parse_chunk(_chunk(ReplyType.BLOCK_STATUS_EXT, struct.pack(">IIQQ", 3, 1, 9, 3)))
    assert ext == m.BlockStatus(3, [(9, 3)])
    err = m.parse_chunk(_chunk(ReplyType.ERROR_OFFSET, struct.pack(">IH2sQ", 22, 2, b"no", 5)))
    assert err == m.ChunkError(Errno.EINVAL, b"no", 5)


@pytest.mark.parametrize(
    ("rtype", "payload"),
    [
        (ReplyType.NONE, b"x"),
        (ReplyType.OFFSET_DATA, b"\0" * 8),
        (ReplyType.OFFSET_HOLE, b"\0" * 11),
        (ReplyType.BLOCK_STATUS, b"\0" * 8),
        (ReplyType.BLOCK_STATUS_EXT, struct.pack(">IIQQ", 0, 2, 1, 0)),
        (ReplyType.ERROR, struct.pack(">IH", 5, 9)),
        (ReplyType(0x42), b""),
    ],
)
def test_malformed_chunks_are_violations(rtype: int, payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        m.parse_chunk(_chunk(rtype, payload))


def test_read_reassembly_rejects_overlap_gaps_and_escapes() -> None:
    def reply(*chunks: m.Chunk) -> Reply:
        return Reply(1, list(chunks))

    data = _chunk(ReplyType.OFFSET_DATA, struct.pack(">Q", 100) + b"abcd")
    hole = _chunk(ReplyType.OFFSET_HOLE, struct.pack(">QI", 104, 4), ReplyFlag.DONE)
    assert reply(data, hole).data(100, 8) == b"abcd\0\0\0\0"
    with pytest.raises(ProtocolViolation, match="overlaps"):
        reply(data, data).data(100, 8)
    with pytest.raises(ProtocolViolation, match="cover 4 of 8"):
        reply(data).data(100, 8)
    with pytest.raises(ProtocolViolation, match="outside"):
        reply(data).data(101, 4)


# ------------------------------------------------------- against qemu-nbd


def _start_qemu(tmp_path: Path, tls_dir: Path | None = None) -> Iterator[Path]:
    if shutil.which("qemu-nbd") is None:
        pytest.skip("qemu-nbd is not installed")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    sock = tmp_path / "nbd.sock"
    options = ServeOptions(socket=sock, image=image, persistent=True, shared=0, tls_dir=tls_dir)
    server = ServerProcess(qemu_nbd_argv(options), log_path=tmp_path / "qemu-nbd.log")
    try:
        server.wait_listening(sock, 15)
        yield sock
    finally:
        server.stop()


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[Path]:
    yield from _start_qemu(tmp_path)


@pytest.fixture
def qemu_tls(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    creds = tlsutil.generate(tmp_path / "tls").directory
    for sock in _start_qemu(tmp_path, tls_dir=creds):
        yield sock, creds


def _client(sock: Path) -> WireClient:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(sock))
    return WireClient(s, timeout=5)


def test_greeting_and_go_with_info_requests(qemu: Path) -> None:
    with _client(qemu) as c:
        greeting = c.negotiate()
        assert greeting.magic == NBDMAGIC
        assert greeting.flags & HandshakeFlag.FIXED_NEWSTYLE
        result = c.go(b"", (Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE))
        assert result.ok
        assert result.export is not None
        assert result.export.size == SIZE
        assert result.block_size is not None
        assert result.block_size.minimum >= 1
        assert c.write(0, b"x" * 512).error == Errno.OK
        assert c.read(0, 512).data(0, 512) == b"x" * 512
        c.disconnect()


def test_unknown_option_and_list(qemu: Path) -> None:
    with _client(qemu) as c:
        c.negotiate()
        assert c.option(0x4242, b"payload").type == Rep.ERR_UNSUP
        listing = c.option(Opt.LIST)
        assert listing.ok
        assert (b"", b"") in listing.exports or listing.exports


def test_export_name_with_and_without_zeroes(qemu: Path) -> None:
    with _client(qemu) as c:
        c.negotiate(ClientFlag.C_FIXED_NEWSTYLE)
        result = c.export_name(b"")
        assert result.zeroes == bytes(124)
        assert result.export.size == SIZE
        assert c.read(0, 16).is_simple
    with _client(qemu) as c:
        c.negotiate()  # NO_ZEROES negotiated since qemu-nbd offers it
        assert c.export_name(b"").zeroes == b""
        assert c.read(0, 16).is_simple


def test_structured_read_and_block_status(qemu: Path) -> None:
    with _client(qemu) as c:
        result = c.open_export(b"", structured=True, meta_contexts=(b"base:allocation",))
        assert result.export is not None
        assert result.export.flags & TransmissionFlag.SEND_DF
        assert c.write(4096, b"y" * 4096).error == Errno.OK
        reply = c.read(0, 3 * 4096)
        assert all(msg.magic == STRUCTURED_REPLY_MAGIC for msg in reply.chunks)
        assert reply.data(0, 3 * 4096) == bytes(4096) + b"y" * 4096 + bytes(4096)
        status = c.block_status(0, 3 * 4096).block_status
        assert len(status) == 1
        first_length, first_flags = status[0].extents[0]
        assert first_length == 4096
        assert first_flags & AllocationState.ZERO
        c.disconnect()


def test_replies_are_matched_by_cookie(qemu: Path) -> None:
    with _client(qemu) as c:
        c.open_export(b"")
        first = c.send_request(Cmd.READ, 0, 512, cookie=0xDEADBEEFCAFEF00D)
        second = c.send_request(Cmd.FLUSH, cookie=5)
        assert c.reply(second).error == Errno.OK
        assert c.reply(first).data(0, 512) == bytes(512)


def test_unknown_client_flag_makes_qemu_disconnect(qemu: Path) -> None:
    with _client(qemu) as c:
        c.read_greeting()
        c.send_client_flags(ClientFlag.C_FIXED_NEWSTYLE | (1 << 7))
        assert c.expect_disconnect(5).disconnected


def test_expect_disconnect_times_out_on_an_open_connection(qemu: Path) -> None:
    with _client(qemu) as c:
        c.negotiate()
        outcome = c.expect_disconnect(0.2)
        assert not outcome.disconnected
        assert c.option(Opt.LIST).ok  # the timeout left the client usable


def test_disconnected_is_raised_on_eof(qemu: Path) -> None:
    with _client(qemu) as c:
        c.negotiate()
        c.send_option(Opt.EXPORT_NAME, b"no-such-export")
        with pytest.raises(Disconnected):
            c.recv_exactly(10)


def test_starttls_with_generated_credentials(qemu_tls: tuple[Path, Path]) -> None:
    sock, creds = qemu_tls
    with _client(sock) as c:
        c.negotiate()
        assert c.go(b"").type == Rep.ERR_TLS_REQD
        assert c.starttls(tlsutil.client_context(creds)).ok
        assert c.tls
        assert c.go(b"").ok
        assert c.read(0, 512).error == Errno.OK
        c.disconnect()


def test_tls_client_without_certificate_is_refused_by_qemu(qemu_tls: tuple[Path, Path]) -> None:
    sock, creds = qemu_tls
    with _client(sock) as c:
        c.negotiate()
        with pytest.raises((OSError, Disconnected)):
            c.starttls(tlsutil.client_context(creds, with_cert=False))
            c.go(b"")  # TLS 1.3 may report the refused certificate only here


class _Endpoint:
    """The slice of conformance.servers.base.Server that the session helpers use."""

    def __init__(self, sock: Path | None) -> None:
        self.sock = sock
        self.export_name = ""
        self.tls = False
        self.tls_dir = None

    def open_socket(self, timeout: float = 10.0) -> socket.socket:
        if self.sock is None:
            raise ConnectionRefusedError("nothing listens")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(self.sock))
        return s


def test_still_serving_probe_passes_against_a_healthy_server(qemu: Path) -> None:
    session.assert_still_serving(_Endpoint(qemu), "nothing in particular")


def test_still_serving_probe_fails_when_nothing_listens() -> None:
    with pytest.raises(SpecViolation, match="expected to be served"):
        session.assert_still_serving(_Endpoint(None), "a fatal blow")


def test_still_serving_probe_checks_data(qemu: Path) -> None:
    with pytest.raises(SpecViolation, match="data written before"):
        session.assert_still_serving(_Endpoint(qemu), "a write", expect=(0, b"\x01" * 512))
