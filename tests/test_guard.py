"""The write permission and the bounded handle, without a server.

conformance/guard.py refuses writes before anything is sent; conformance/handle.py
puts a deadline on every blocking libnbd call.  Here they are driven with a
stand-in for ``nbd.NBD`` whose calls block on a socketpair, so that the
watchdog's shutdown is what wakes them, as it wakes libnbd.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

import nbd
import pytest

from conformance.guard import (
    READ_ONLY,
    UNRESTRICTED,
    UnmarkedWrite,
    WritePermission,
    WritesNotAllowed,
)
from conformance.handle import Handle, ServerTimeout
from conformance.watchdog import Watchdog
from conformance.wire import Cmd
from conformance.wire import messages as m
from conformance.wire.client import WireClient

UNMARKED = WritePermission(marked=False, target_writable=True, check="t.py::test_x")
NOT_ALLOWED = WritePermission(marked=True, target_writable=False)


# ---------------------------------------------------------------- WritePermission


def test_unmarked_write_names_the_marker_and_the_check() -> None:
    with pytest.raises(UnmarkedWrite, match=r"not marked @pytest.mark.writes.*t.py::test_x"):
        UNMARKED.require("NBD_CMD_WRITE")


def test_marked_write_to_a_target_not_allowed_names_the_option() -> None:
    with pytest.raises(WritesNotAllowed, match="--allow-writes"):
        NOT_ALLOWED.require("NBD_CMD_TRIM")


def test_marked_write_to_a_writable_target_is_let_through() -> None:
    UNRESTRICTED.require("NBD_CMD_WRITE")


@pytest.mark.parametrize("cmd", [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES], ids=lambda c: c.name)
@pytest.mark.parametrize("extended", [False, True])
def test_write_requests_hidden_in_raw_bytes_are_found(cmd: Cmd, extended: bool) -> None:
    pack = m.pack_extended_request if extended else m.pack_request
    data = b"junk" + pack(Cmd.READ, 0, 512) + pack(cmd, 4096, 512, payload=b"\0" * 512)
    with pytest.raises(WritesNotAllowed):
        NOT_ALLOWED.require_for_bytes(data)
    UNRESTRICTED.require_for_bytes(data)


def test_raw_bytes_without_a_write_request_pass() -> None:
    data = m.pack_request(Cmd.READ, 0, 512) + m.pack_request(Cmd.FLUSH, 0, 0)
    READ_ONLY.require_for_bytes(data)


# ------------------------------------------------------------ the raw-wire client


class _Sink:
    def __init__(self) -> None:
        self.sent = bytearray()

    def settimeout(self, _: float) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.sent += data


def test_wire_client_refuses_a_write_before_sending_anything() -> None:
    sink = _Sink()
    client = WireClient(sink, permission=NOT_ALLOWED)  # type: ignore[arg-type]
    with pytest.raises(WritesNotAllowed):
        client.send_request(Cmd.WRITE, 0, 4, payload=b"abcd")
    with pytest.raises(WritesNotAllowed):
        client.send_request(Cmd.WRITE_ZEROES, 0, 4096)
    assert sink.sent == b""
    client.send_request(Cmd.READ, 0, 4096)
    assert len(sink.sent) == m.REQUEST.size


def test_wire_client_in_transmission_refuses_raw_write_bytes() -> None:
    sink = _Sink()
    client = WireClient(sink, permission=UNMARKED)  # type: ignore[arg-type]
    client.transmitting = True
    raw = struct.pack(">IHHQQI", 0x25609513, 0, int(Cmd.TRIM), 1, 0, 4096)
    with pytest.raises(UnmarkedWrite):
        client.send(raw)
    assert sink.sent == b""


# ------------------------------------------------------------------- the handle


class FakeNBD:
    """Calls that block until the peer end of a socketpair says something, or closes."""

    def __init__(self) -> None:
        self.ours, self.peer = socket.socketpair()
        self.calls: list[str] = []

    def aio_get_fd(self) -> int:
        return self.ours.fileno()

    def get_handle_name(self) -> str:
        return "fake"

    def get_export_name(self) -> str:
        return ""

    def aio_is_negotiating(self) -> bool:
        return False

    def _wait(self, name: str) -> bytes:
        self.calls.append(name)
        data = self.ours.recv(16)
        if not data:
            raise nbd.Error("read: Transport endpoint is not connected", 107)
        return data

    def pread(self, count: int, offset: int, flags: int = 0) -> bytes:
        return self._wait("pread")

    def pwrite(self, buf: bytes, offset: int, flags: int = 0) -> None:
        self._wait("pwrite")

    def aio_trim(self, count: int, offset: int, completion: Any = None, flags: int = 0) -> int:
        self.calls.append("aio_trim")
        return 1

    def can_trim(self) -> bool:
        return True


_fakes: list[FakeNBD] = []


@pytest.fixture(autouse=True)
def _close_fakes() -> Any:
    yield
    while _fakes:
        fake = _fakes.pop()
        fake.ours.close()
        fake.peer.close()


def _handle(permission: WritePermission, timeout: float = 0.2) -> tuple[Handle, FakeNBD]:
    fake = FakeNBD()
    _fakes.append(fake)
    handle = Handle(fake, permission=permission, timeout=timeout)  # type: ignore[arg-type]
    handle.connected()
    return handle, fake


def test_a_blocking_call_without_reply_fails_at_its_deadline() -> None:
    handle, fake = _handle(UNRESTRICTED, timeout=0.2)
    with pytest.raises(ServerTimeout, match=r"no reply to NBD_CMD_READ within 0.2 s"):
        handle.pread(512, 0)
    assert fake.calls == ["pread"]


def test_a_blocking_call_answered_in_time_returns_its_result() -> None:
    handle, fake = _handle(UNRESTRICTED, timeout=30)
    fake.peer.sendall(b"data")
    assert handle.pread(4, 0) == b"data"


def test_a_write_is_refused_before_libnbd_is_called() -> None:
    handle, fake = _handle(NOT_ALLOWED)
    with pytest.raises(WritesNotAllowed):
        handle.pwrite(b"x", 0)
    with pytest.raises(WritesNotAllowed):
        handle.aio_trim(4096, 0)
    assert fake.calls == []


def test_other_attributes_are_libnbd_s_own() -> None:
    handle, _ = _handle(READ_ONLY)
    assert handle.can_trim() is True


def test_the_watchdog_never_fires_after_disarm() -> None:
    dog = Watchdog()
    spared, spared_peer = socket.socketpair()
    stuck, stuck_peer = socket.socketpair()
    alarm = dog.arm(spared.fileno(), 0.05)
    assert dog.disarm(alarm) is False
    fired = dog.arm(stuck.fileno(), 0.05)
    done = threading.Event()

    def blocked_reader() -> None:
        stuck.recv(1)
        done.set()

    threading.Thread(target=blocked_reader, daemon=True).start()
    assert done.wait(10), "the watchdog did not wake the blocked reader"
    assert dog.disarm(fired) is True
    spared.sendall(b"x")  # the disarmed socket was left alone
    assert spared_peer.recv(1) == b"x"
    for sock in (spared, spared_peer, stuck, stuck_peer):
        sock.close()


# ------------------------------------------------------------------- the evidence


def test_calls_and_frames_are_recorded_in_the_running_check_s_transcript() -> None:
    from conformance import evidence

    transcript = evidence.begin()
    try:
        handle, fake = _handle(NOT_ALLOWED, timeout=30)
        fake.peer.sendall(b"abcd")
        handle.pread(4, 0)
        with pytest.raises(WritesNotAllowed):
            handle.pwrite(b"\x01" * 100, 0)
        client = WireClient(_Sink(), permission=UNRESTRICTED)  # type: ignore[arg-type]
        client.send_request(Cmd.READ, 0, 512, cookie=0xFEDCBA9876543210)
    finally:
        assert evidence.end() is transcript
    text = transcript.text()
    assert "nbd#1 pread(4, 0) -> <4 bytes 61626364>" in text, text
    assert "nbd#1 pwrite(<100 bytes 01010101" in text and "WritesNotAllowed" in text, text
    assert "wire#2 C: READ flags=0x0 cookie=0xfedcba9876543210 offset=0 length=512" in text, text
    assert "[25609513" in text, "the request's header in hex"


def test_the_transcript_keeps_the_end_and_says_what_it_dropped() -> None:
    from conformance.evidence import MAX_LINE, Transcript

    transcript = Transcript(limit=3)
    for i in range(10):
        transcript.add("wire#1", f"line {i} " + "x" * 1000)
    lines = transcript.text().splitlines()
    assert lines[0] == "... 7 earlier lines not kept"
    assert lines[-1].startswith("wire#1 line 9")
    assert all(len(line) <= MAX_LINE + len("wire#1 ") for line in lines)
