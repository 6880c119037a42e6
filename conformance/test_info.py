"""What the server says about an export when it enters transmission: size, flags, sizes.

libnbd negotiates with NBD_OPT_GO (NBD_INFO_EXPORT, NAME, DESCRIPTION and
BLOCK_SIZE requested); the raw handshake itself is checked in
test_handshake.py and test_options.py.
"""

from __future__ import annotations

import struct

import nbd
import pytest

from conformance.servers.base import ServerConfig
from conformance.spec import MAY, MUST, SHOULD, expect, expect_equal, spec, unsupported
from conformance.wire import Disconnected, Info, Opt
from conformance.wire import messages as m
from conformance.wire import session as s

FLAGS = "Values / Handshake phase / Flag fields / Transmission flags"
SIZES = "Size constraints"


def _is_power_of_2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@spec("Values / Handshake phase / Option reply types", MUST)
def test_export_size_is_the_configured_size(server):
    """NBD_INFO_EXPORT carries the size of the export the server was started with."""
    if not server.started_by_suite:
        unsupported("the size of a server the suite did not start is not known")
    h = server.connect()
    expect_equal(h.get_size(), server.config.size, "export size")


@spec("Values / Handshake phase / Option reply types", MUST)
def test_every_connection_sees_the_same_size_and_flags(server):
    """Two connections to one export are told the same size and the same capabilities."""
    a, b = server.connect(2)

    def facts(h):
        return {
            "size": h.get_size(),
            "read_only": h.is_read_only(),
            "flush": h.can_flush(),
            "fua": h.can_fua(),
            "trim": h.can_trim(),
            "zero": h.can_zero(),
            "fast_zero": h.can_fast_zero(),
            "multi_conn": h.can_multi_conn(),
            "cache": h.can_cache(),
            "df": h.can_df(),
        }

    expect_equal(facts(b), facts(a), "second connection's export facts")


@spec(
    FLAGS,
    MUST,
    quote="MUST set this transmission flag to 0 if `NBD_FLAG_SEND_WRITE_ZEROES` is not set.",
)
def test_fast_zero_only_with_write_zeroes(server):
    h = server.connect()
    if h.can_fast_zero():
        expect(
            h.can_zero(),
            "NBD_FLAG_SEND_FAST_ZERO implies NBD_FLAG_SEND_WRITE_ZEROES",
            expected="SEND_WRITE_ZEROES set",
            actual="SEND_WRITE_ZEROES clear",
        )


@spec(
    FLAGS,
    MUST,
    quote="The server MUST set this transmission flag to 1 if the "
    "`NBD_CMD_READ` request supports the `NBD_CMD_FLAG_DF` flag, and MUST leave this flag "
    "clear if structured replies have not been negotiated.",
)
def test_df_clear_without_structured_replies(server):
    h = server.connect(structured_replies=False)
    expect(
        not h.get_structured_replies_negotiated(),
        "structured replies not requested",
        expected="not negotiated",
        actual="negotiated",
    )
    expect(
        not h.can_df(),
        "NBD_FLAG_SEND_DF without structured replies",
        expected="clear",
        actual="set",
    )


@spec(FLAGS, MAY)
def test_read_only_export_advertises_read_only(ro_server):
    """The server MAY set NBD_FLAG_READ_ONLY; one started read-only is expected to say so (a
    property of its configuration, which no key-word sentence requires)."""
    h = ro_server.connect()
    expect(
        h.is_read_only(), "NBD_FLAG_READ_ONLY on a read-only export", expected="set", actual="clear"
    )


@spec(FLAGS, MUST)
def test_writable_export_does_not_advertise_read_only(server):
    """A server started writable and then saying read-only is not the server configured."""
    h = server.connect()
    expect(
        not h.is_read_only(),
        "NBD_FLAG_READ_ONLY on a writable export",
        expected="clear",
        actual="set",
    )


def _block_sizes(h):
    return (
        h.get_block_size(nbd.SIZE_MINIMUM),
        h.get_block_size(nbd.SIZE_PREFERRED),
        h.get_block_size(nbd.SIZE_MAXIMUM),
    )


def _advertised_block_sizes(server):
    h = server.connect()
    minimum, preferred, maximum = _block_sizes(h)
    if not (minimum or preferred or maximum):
        unsupported("the server sends no NBD_INFO_BLOCK_SIZE")
    return h, minimum, preferred, maximum


@spec(
    SIZES,
    MUST,
    quote="If advertised, this value MUST be a power of 2, MUST NOT be larger "
    "than 2^16 (65,536), and MAY be as small as 1 for an export backed by a regular file",
)
def test_minimum_block_size_is_a_power_of_2_up_to_64k(server):
    _, minimum, _, _ = _advertised_block_sizes(server)
    expect(
        _is_power_of_2(minimum) and minimum <= 65536,
        "minimum block size",
        expected="a power of 2 <= 65536",
        actual=minimum,
    )


@spec(
    SIZES,
    MUST,
    quote="If advertised, this MUST be a power of 2 at least as large as the "
    "maximum of the minimum block size and 2^9 (512), although larger values (such as 4,096, "
    "or even the minimum granularity of a hole) are more typical.",
)
def test_preferred_block_size_is_a_power_of_2_at_least_512(server):
    _, minimum, preferred, _ = _advertised_block_sizes(server)
    expect(
        _is_power_of_2(preferred) and preferred >= max(minimum, 512),
        "preferred block size",
        expected=f"a power of 2 >= {max(minimum, 512)}",
        actual=preferred,
    )


@spec(
    SIZES,
    MUST,
    quote="If advertised, it MAY be something other than a power of 2, but MUST "
    "be at least as large as the preferred block size, and SHOULD be at least 2^20 "
    "(1,048,576) if the export is that large.",
)
def test_maximum_payload_at_least_preferred_block_size(server):
    _, _, preferred, maximum = _advertised_block_sizes(server)
    expect(maximum >= preferred, "maximum payload size", expected=f">= {preferred}", actual=maximum)


@spec(
    SIZES,
    SHOULD,
    quote="If advertised, it MAY be something other than a power of 2, but "
    "MUST be at least as large as the preferred block size, and SHOULD be at least 2^20 "
    "(1,048,576) if the export is that large.",
)
def test_maximum_payload_at_least_1m(server):
    h, _, _, maximum = _advertised_block_sizes(server)
    expect(
        maximum >= min(1 << 20, h.get_size()),
        "maximum payload size",
        expected=f">= {min(1 << 20, h.get_size())}",
        actual=maximum,
    )


@spec(
    SIZES,
    SHOULD,
    quote="If a server advertises a minimum block size, the advertised export "
    "size SHOULD be an integer multiple of that block size, since otherwise, the client would "
    "be unable to access the final few bytes of the export.",
)
def test_export_size_is_a_multiple_of_minimum_block_size(start_server):
    server = start_server(ServerConfig(size=1024 * 1024 + 512))
    h, minimum, _, _ = _advertised_block_sizes(server)
    expect_equal(
        h.get_size() % max(minimum, 1),
        0,
        f"export size {h.get_size()} modulo minimum block size {minimum}",
    )


@spec("Values / Handshake phase / Option reply types", MAY)
def test_description_is_reported(start_server):
    """A description the server was configured with reaches a client that asks for it."""
    server = start_server(ServerConfig(description="conformance suite export"))
    h = server.connect(full_info=True)
    try:
        description = h.get_export_description()
    except nbd.Error:
        description = None
    expect_equal(description, "conformance suite export", "NBD_INFO_DESCRIPTION")


@spec("Values / Handshake phase / Option reply types", MUST)
def test_named_export_is_served(start_server):
    """A server configured with an export name lets a client in by that name."""
    server = start_server(ServerConfig(export_name="conformance-named"))
    h = server.connect()
    expect(
        h.aio_is_ready(),
        "connection to the named export",
        expected="ready",
        actual=h.connection_state(),
    )
    try:
        canonical = h.get_canonical_export_name()
    except nbd.Error:
        return  # NBD_INFO_NAME MAY be omitted when the client used the canonical name
    expect_equal(canonical, server.export_name, "NBD_INFO_NAME")


@pytest.mark.disruptive  # malformed framing: a fragile server may crash or hang
@spec(
    "Values / Handshake phase / Option reply types",
    SHOULD,
    "The option sent by the client is known by this server, but was determined by the server to "
    "be syntactically or semantically invalid.",
)
def test_info_with_more_requests_than_its_count_gets_err_invalid(server):
    """NBD_OPT_INFO counting one information request but carrying two: the option's length
    contradicts its count.  A server that checks only that the count fits reads the extra
    request as if it were counted and answers ACK; ERR_INVALID (or a hard disconnect, which a
    client breaking a MUST permits) is due."""
    data = m.pack_name_and_infos(s.export_name(server), (Info.BLOCK_SIZE,))
    data += struct.pack(">H", Info.NAME)
    client = s.negotiated(server)
    try:
        outcome = client.option(Opt.INFO, data).type.name
    except Disconnected:
        return
    finally:
        client.close()
    expect_equal(outcome, "ERR_INVALID", "NBD_OPT_INFO with one request more than its count")
