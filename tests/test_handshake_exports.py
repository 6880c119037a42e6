"""Choosing an export: NBD_OPT_EXPORT_NAME, ABORT, LIST, INFO and GO.

Unit tests of protocol/handshake.py, driven by tests/handshake_client.py.
"""

from __future__ import annotations

import struct

import pytest

from reference_server.protocol.constants import Info, Option, Reply, TransmissionFlag
from reference_server.protocol.events import Close, EnterTransmission, NeedData
from reference_server.protocol.export import BlockSizes, ExportInfo
from tests.handshake_client import (
    FIXED,
    NO_ZEROES,
    SIZE,
    Client,
    assert_still_haggling,
    info_data,
    infos,
    option,
)

# ------------------------------------------------------------- EXPORT_NAME


@pytest.mark.parametrize(("flags", "zeroes"), [(FIXED | NO_ZEROES, 0), (FIXED, 124)])
def test_export_name_reply_with_and_without_zeroes(flags: int, zeroes: int) -> None:
    c = Client(flags=flags)
    event = c.send(option(Option.EXPORT_NAME))
    assert isinstance(event, EnterTransmission)
    out = c.hs.data_to_send()
    assert len(out) == 10 + zeroes
    size, tflags = struct.unpack_from(">QH", out)
    assert size == SIZE
    assert tflags == event.negotiated.flags
    assert tflags & TransmissionFlag.HAS_FLAGS
    # No structured replies were negotiated: DF MUST be clear.
    assert not tflags & TransmissionFlag.SEND_DF
    assert out[10:] == bytes(zeroes)


def test_export_name_keeps_transmission_bytes_that_arrived_with_it() -> None:
    c = Client()
    request = b"\x25\x60\x95\x13" + bytes(24)
    event = c.send(option(Option.EXPORT_NAME) + request)
    assert isinstance(event, EnterTransmission)
    assert c.hs.buffered == request


def test_export_name_unknown_export_terminates() -> None:
    # "If the chosen export does not exist ... the server MUST terminate the session."
    c = Client()
    event = c.send(option(Option.EXPORT_NAME, b"nope"))
    assert isinstance(event, Close) and not event.clean
    assert c.hs.data_to_send() == b""


def test_export_name_of_4096_bytes_is_served_and_4097_refused() -> None:
    long_name = "n" * 4096
    exports = (ExportInfo(long_name, SIZE),)
    c = Client(exports)
    assert isinstance(c.send(option(Option.EXPORT_NAME, long_name.encode())), EnterTransmission)
    c = Client(exports)
    event = c.send(option(Option.EXPORT_NAME, long_name.encode() + b"n"))
    assert isinstance(event, Close)


def test_export_name_after_extended_headers_terminates() -> None:
    # Ext-header extension: "Once extended headers are successfully requested,
    # a client MUST NOT use NBD_OPT_EXPORT_NAME"; the server cannot reply an error.
    c = Client()
    assert c.only(Option.EXTENDED_HEADERS).type == Reply.ACK
    assert isinstance(c.send(option(Option.EXPORT_NAME)), Close)


def test_export_name_refused_for_export_with_non_default_block_size() -> None:
    # "Size constraints": such a server MAY refuse NBD_OPT_EXPORT_NAME via a hard disconnect.
    c = Client((ExportInfo("", SIZE, block_sizes=BlockSizes(512, 4096, 1 << 25)),))
    assert isinstance(c.send(option(Option.EXPORT_NAME)), Close)


def test_next_event_after_transmission_started_is_close() -> None:
    c = Client()
    c.go()
    assert isinstance(c.send(option(Option.LIST)), Close)
    assert c.hs.data_to_send() == b""


# ------------------------------------------------------------------ ABORT


@pytest.mark.parametrize("data", [b"", b"ignored data"])
def test_abort_is_acked_then_a_soft_disconnect(data: bytes) -> None:
    # "NBD_OPT_ABORT": "The server MUST reply with NBD_REP_ACK"; data SHOULD be ignored.
    c = Client()
    event, replies = c.opt(Option.ABORT, data)
    assert [(r.option, r.type, r.data) for r in replies] == [(Option.ABORT, Reply.ACK, b"")]
    assert isinstance(event, Close) and event.clean


# ------------------------------------------------------------------- LIST


def test_list_returns_each_export_with_description_then_ack() -> None:
    exports = (ExportInfo("", SIZE, description="default"), ExportInfo("disk", SIZE))
    c = Client(exports)
    event, replies = c.opt(Option.LIST)
    assert isinstance(event, NeedData)
    assert [r.type for r in replies] == [Reply.SERVER, Reply.SERVER, Reply.ACK]
    listed = {}
    for r in replies[:2]:
        (n,) = struct.unpack_from(">I", r.data)
        assert n <= len(r.data) - 4
        listed[r.data[4 : 4 + n]] = r.data[4 + n :]
    assert listed == {b"": b"default", b"disk": b""}


def test_list_with_data_is_invalid_and_haggling_continues() -> None:
    c = Client()
    assert c.only(Option.LIST, b"x").type == Reply.ERR_INVALID
    assert_still_haggling(c)


# ------------------------------------------------------------ INFO and GO


def test_info_reports_export_and_block_size_then_ack_without_ending_haggling() -> None:
    c = Client()
    event, replies = c.opt(Option.INFO, info_data(b""))
    assert isinstance(event, NeedData)
    assert replies[-1].type == Reply.ACK
    assert all(r.option == Option.INFO for r in replies)
    got = infos(replies)
    assert len(got[Info.EXPORT]) == 10  # header length 12 incl. the type
    size, flags = struct.unpack(">QH", got[Info.EXPORT])
    assert size == SIZE
    assert flags & TransmissionFlag.HAS_FLAGS
    assert struct.unpack(">III", got[Info.BLOCK_SIZE]) == (1, 4096, 1 << 25)
    assert_still_haggling(c)


def test_info_then_go_with_same_parameters_report_the_same_information() -> None:
    c = Client()
    _, first = c.opt(Option.INFO, info_data(b"", Info.BLOCK_SIZE))
    event, second = c.opt(Option.GO, info_data(b"", Info.BLOCK_SIZE))
    assert isinstance(event, EnterTransmission)
    assert infos(first) == infos(second)


def test_go_name_and_description_information_requests() -> None:
    c = Client((ExportInfo("disk", SIZE, description="a test disk"),))
    event, replies = c.opt(Option.GO, info_data(b"disk", Info.NAME, Info.DESCRIPTION, 0x7777))
    assert isinstance(event, EnterTransmission)
    got = infos(replies)
    assert got[Info.NAME] == b"disk"
    assert got[Info.DESCRIPTION] == b"a test disk"
    assert 0x7777 not in got  # an unknown request is ignored, never answered
    assert replies[-1].type == Reply.ACK
    assert event.negotiated.export.name == "disk"
    # "The server MUST NOT send any zero padding bytes after the NBD_REP_ACK".
    assert c.hs.data_to_send() == b""


def test_go_unknown_export_is_err_unknown_with_no_info() -> None:
    c = Client()
    event, replies = c.opt(Option.GO, info_data(b"missing", Info.NAME))
    assert isinstance(event, NeedData)
    assert [r.type for r in replies] == [Reply.ERR_UNKNOWN]
    assert_still_haggling(c)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00",
        struct.pack(">I", 0) + b"\x00",  # count missing one byte
        struct.pack(">I", 7) + b"abc" + struct.pack(">H", 0),  # name runs past the payload
        struct.pack(">I", 0xFFFFFFFF) + struct.pack(">H", 0),
        struct.pack(">IH", 0, 2) + struct.pack(">H", Info.NAME),  # one request short
        struct.pack(">IH", 0, 0) + b"\x00",  # trailing byte
    ],
)
@pytest.mark.parametrize("number", [Option.INFO, Option.GO])
def test_malformed_info_and_go_are_invalid(number: int, data: bytes) -> None:
    c = Client()
    reply = c.only(number, data)
    assert reply.type == Reply.ERR_INVALID
    assert_still_haggling(c)


@pytest.mark.parametrize("number", [Option.INFO, Option.GO])
def test_export_names_of_4096_bytes_work_and_4097_are_refused(number: int) -> None:
    name = "x" * 4096
    c = Client((ExportInfo(name, SIZE),))
    event, replies = c.opt(number, info_data(name.encode()))
    assert replies[-1].type == Reply.ACK
    c = Client((ExportInfo(name, SIZE),))
    event, replies = c.opt(number, info_data(name.encode() + b"x"))
    assert isinstance(event, NeedData)
    # "Conventions": strings MUST be no longer than 4096 bytes.
    assert [r.type for r in replies] in ([Reply.ERR_INVALID], [Reply.ERR_TOO_BIG])
    assert_still_haggling(c)


def test_go_on_export_with_minimum_block_size_requires_block_size_request() -> None:
    export = ExportInfo("", SIZE, block_sizes=BlockSizes(512, 4096, 1 << 20))
    c = Client((export,))
    event, replies = c.opt(Option.GO, info_data(b""))
    assert isinstance(event, NeedData)
    assert replies[-1].type == Reply.ERR_BLOCK_SIZE_REQD
    # "SHOULD ensure it first sends an NBD_INFO_BLOCK_SIZE information reply".
    assert struct.unpack(">III", infos(replies)[Info.BLOCK_SIZE]) == (512, 4096, 1 << 20)
    # INFO alone commits to nothing and is answered; GO with BLOCK_SIZE succeeds.
    _, replies = c.opt(Option.INFO, info_data(b""))
    assert replies[-1].type == Reply.ACK
    negotiated = c.go(b"", Info.BLOCK_SIZE).negotiated
    assert negotiated.block_sizes_agreed


def test_go_without_block_size_request_on_default_export_is_not_agreed() -> None:
    c = Client()
    assert not c.go().negotiated.block_sizes_agreed
    c = Client()
    assert c.go(b"", Info.BLOCK_SIZE).negotiated.block_sizes_agreed


def test_transmission_flags_of_read_only_and_multi_conn_exports() -> None:
    ro = ExportInfo("", SIZE, read_only=True, multi_conn=True)
    negotiated = Client((ro,)).go().negotiated
    flags = negotiated.flags
    assert flags & TransmissionFlag.READ_ONLY
    assert flags & TransmissionFlag.CAN_MULTI_CONN
    for write_only in (
        TransmissionFlag.SEND_TRIM,
        TransmissionFlag.SEND_WRITE_ZEROES,
        TransmissionFlag.SEND_FAST_ZERO,
    ):
        assert not flags & write_only
    rw = Client((ExportInfo("", SIZE),)).go().negotiated.flags
    assert not rw & (TransmissionFlag.READ_ONLY | TransmissionFlag.CAN_MULTI_CONN)
    assert rw & TransmissionFlag.SEND_TRIM and rw & TransmissionFlag.SEND_WRITE_ZEROES
