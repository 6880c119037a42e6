"""Unit tests of the annotated wire log (trace.py) and of the core's trace calls."""

from __future__ import annotations

import io
import struct
import threading

from reference_server.backends.memory import PAGE_SIZE, MemoryBackend
from reference_server.dispatch import execute
from reference_server.protocol.constants import (
    Command,
    CommandFlag,
    Errno,
    Info,
    Option,
    Reply,
    TransmissionFlag,
)
from reference_server.protocol.events import EnterTransmission
from reference_server.protocol.events import Request as RequestEvent
from reference_server.protocol.export import ExportInfo
from reference_server.protocol.handshake import Handshake
from reference_server.protocol.transmission import Transmission
from reference_server.trace import TraceLog, describe, format_message

IHAVEOPT = 0x49484156454F5054


def test_describe_uses_the_spec_names() -> None:
    assert describe(Option.GO) == "NBD_OPT_GO"
    assert describe(Reply.ERR_UNSUP) == "NBD_REP_ERR_UNSUP"
    assert describe(Info.BLOCK_SIZE) == "NBD_INFO_BLOCK_SIZE"
    assert describe(Command.WRITE_ZEROES) == "NBD_CMD_WRITE_ZEROES"
    assert describe(Errno.ENOSPC) == "NBD_ENOSPC"
    flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY
    assert describe(flags) == "NBD_FLAG_HAS_FLAGS|NBD_FLAG_READ_ONLY"
    assert (
        describe(CommandFlag.FUA | CommandFlag.NO_HOLE) == "NBD_CMD_FLAG_FUA|NBD_CMD_FLAG_NO_HOLE"
    )
    assert describe(CommandFlag(0)) == "0"


def test_describe_unknown_wire_values_stays_printable() -> None:
    assert describe(Option(0x1234)) == "Option(0x1234)"
    assert describe(Command(99)) == "Command(0x63)"


def test_describe_plain_values() -> None:
    assert describe(b"ab\x00") == "b'ab\\x00'"
    assert describe("disk") == "'disk'"
    assert describe(4096) == "4096"


def test_format_message_puts_names_first_then_fields() -> None:
    line = format_message(
        "S", "option reply", {"option": Option.INFO, "reply": Reply.ACK, "length": 0}
    )
    assert line == "S> option reply NBD_OPT_INFO NBD_REP_ACK length=0"
    line = format_message("C", "option", {"option": Option.LIST, "length": 0, "data": b""})
    assert line == "C> option NBD_OPT_LIST length=0"


def test_trace_log_prefixes_each_line_with_the_connection() -> None:
    out = io.StringIO()
    log = TraceLog(out)
    log.for_connection(3)("C", "client flags", {"flags": 1})
    log.for_connection(4).note("TLS established")
    assert out.getvalue() == "[3] C> client flags flags=1\n[4] -- TLS established\n"


def test_trace_log_lines_stay_whole_under_threads() -> None:
    out = io.StringIO()
    log = TraceLog(out)

    def writer(n: int) -> None:
        tracer = log.for_connection(n)
        for _ in range(200):
            tracer("S", "simple reply", {"cookie": n, "error": Errno.OK})

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    lines = out.getvalue().splitlines()
    assert len(lines) == 800
    assert all(line.endswith("error=NBD_OK") and line.startswith("[") for line in lines)


def _session_trace() -> list[str]:
    out = io.StringIO()
    tracer = TraceLog(out).for_connection(1)
    hs = Handshake({"": ExportInfo("", 1 << 20)}, trace=tracer)
    hs.receive_data(struct.pack(">I", 3))
    hs.receive_data(struct.pack(">QII", IHAVEOPT, Option.STRUCTURED_REPLY, 0))
    go = struct.pack(">IHH", 0, 1, Info.BLOCK_SIZE)
    hs.receive_data(struct.pack(">QII", IHAVEOPT, Option.GO, len(go)) + go)
    event = hs.next_event()
    assert isinstance(event, EnterTransmission)
    tx = Transmission(event.negotiated, trace=tracer)
    tx.receive_data(struct.pack(">IHHQQI", 0x25609513, 0, Command.READ, 7, 0, 512))
    cmd = tx.next_event()
    assert isinstance(cmd, RequestEvent)
    execute(tx.replies, cmd, MemoryBackend(1 << 20))
    tx.receive_data(struct.pack(">IHHQQI", 0x25609513, 0, 42, 8, 0, 0))
    tx.next_event()
    return out.getvalue().splitlines()


def test_a_session_is_traced_one_line_per_message() -> None:
    lines = _session_trace()
    expected_starts = [
        "[1] S> greeting flags=NBD_FLAG_FIXED_NEWSTYLE|NBD_FLAG_NO_ZEROES",
        "[1] C> client flags flags=NBD_FLAG_C_FIXED_NEWSTYLE|NBD_FLAG_C_NO_ZEROES",
        "[1] C> option NBD_OPT_STRUCTURED_REPLY length=0",
        "[1] S> option reply NBD_OPT_STRUCTURED_REPLY NBD_REP_ACK",
        "[1] C> option NBD_OPT_GO length=8",
        "[1] S> option reply NBD_OPT_GO NBD_REP_INFO",
        "[1] S> option reply NBD_OPT_GO NBD_REP_INFO",
        "[1] S> option reply NBD_OPT_GO NBD_REP_ACK",
        "[1] C> request NBD_CMD_READ flags=0 cookie=7 offset=0 length=512",
        "[1] S> chunk cookie=7 type=NBD_REPLY_TYPE_OFFSET_HOLE",
        "[1] C> request Command(0x2a)",
        "[1] S> chunk cookie=8 type=NBD_REPLY_TYPE_ERROR",
    ]
    assert len(lines) == len(expected_starts), "\n".join(lines)
    for line, start in zip(lines, expected_starts, strict=True):
        assert line.startswith(start), f"expected {start!r}, got {line!r}"
    assert "info=NBD_INFO_EXPORT size=1048576" in lines[5]
    assert "error=NBD_EINVAL" in lines[-1]


class _UnreadableBackend(MemoryBackend):
    """Reads fail after the reply was planned: the data regions are never filled."""

    def pread_into(self, view: memoryview, offset: int, *, fresh: bool = False) -> None:
        raise OSError(5, "injected")


def test_read_chunks_are_traced_only_once_filled() -> None:
    out = io.StringIO()
    tracer = TraceLog(out).for_connection(1)
    hs = Handshake({"": ExportInfo("", 1 << 20)})
    hs.receive_data(struct.pack(">I", 3))
    hs.receive_data(struct.pack(">QII", IHAVEOPT, Option.STRUCTURED_REPLY, 0))
    go = struct.pack(">IHH", 0, 1, Info.BLOCK_SIZE)
    hs.receive_data(struct.pack(">QII", IHAVEOPT, Option.GO, len(go)) + go)
    event = hs.next_event()
    assert isinstance(event, EnterTransmission)
    tx = Transmission(event.negotiated, trace=tracer)
    backend = _UnreadableBackend(1 << 20)
    backend.pwrite(b"data", PAGE_SIZE, False)  # a hole, then data: OFFSET_HOLE + OFFSET_DATA
    tx.receive_data(struct.pack(">IHHQQI", 0x25609513, 0, Command.READ, 9, 0, 2 * PAGE_SIZE))
    cmd = tx.next_event()
    assert isinstance(cmd, RequestEvent)
    execute(tx.replies, cmd, backend)
    lines = out.getvalue().splitlines()
    # The planned chunks were never sent, the hole included: only the error reply is traced.
    assert len(lines) == 2, "\n".join(lines)
    assert lines[0].startswith("[1] C> request NBD_CMD_READ")
    assert lines[1].startswith("[1] S> chunk cookie=9 type=NBD_REPLY_TYPE_ERROR"), lines[1]
    assert "error=NBD_EIO" in lines[1]
