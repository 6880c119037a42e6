"""Requests the client must not send: out of bounds, unaligned, wrong flags, zero length.

libnbd refuses to send them; strict mode is relaxed so that the server,
not libnbd, has to deal with them.  The spec mostly says what the server
SHOULD answer, and these checks are graded accordingly.
"""

from __future__ import annotations

import contextlib
import errno

import nbd
import pytest

from conformance.data import pattern
from conformance.servers import ServerConfig
from conformance.spec import MUST, SHOULD, expect, expect_data, expect_nbd_error, spec, unsupported

ERRORS = "Values / Transmission phase / Error values"
REQUESTS = "Values / Transmission phase / Request types"
SIZES = "Size constraints"

BEYOND_END = {
    # command: (callable on (h, offset, length), errno the spec names, needs)
    "read": (lambda h, o, n: h.pread(n, o), errno.EINVAL, None),
    "trim": (lambda h, o, n: h.trim(n, o), errno.EINVAL, "can_trim"),
    "write": (lambda h, o, n: h.pwrite(b"\x5a" * n, o), errno.ENOSPC, None),
    "write-zeroes": (lambda h, o, n: h.zero(n, o), errno.ENOSPC, "can_zero"),
}


def _needs(h, capability):
    if capability and not getattr(h, capability)():
        unsupported(f"the server does not advertise {capability}")


@pytest.mark.writes
@pytest.mark.parametrize("start", ["straddling", "past", "one-block-over"])
@pytest.mark.parametrize("command", BEYOND_END)
@spec(
    ERRORS,
    SHOULD,
    quote="The server SHOULD return `NBD_ENOSPC` if it receives a write request "
    "including one or more sectors beyond the size of the device.",
)
def test_request_beyond_the_end_gets_the_named_error(server, command, start):
    """Read/trim past the end: EINVAL; write/write-zeroes past the end: ENOSPC.

    "one-block-over" ends a single minimum block (one byte, where no minimum is
    advertised) past the end: the smallest overrun, which a bounds check off by
    one lets through.
    """
    h = server.connect(strict=0)
    call, expected, needs = BEYOND_END[command]
    _needs(h, needs)
    size = h.get_size()
    minimum = max(1, h.get_block_size(nbd.SIZE_MINIMUM))
    offset = {
        "straddling": size - 4096,
        "past": size + 4096,
        "one-block-over": size - 8192 + minimum,
    }[start]
    expect_nbd_error(
        lambda: call(h, offset, 8192),
        expected,
        f"{command} of 8192 bytes at {offset} (export size {size})",
    )


@pytest.mark.writes
@pytest.mark.parametrize("command", BEYOND_END)
@spec(ERRORS, MUST)
def test_request_beyond_the_end_fails_without_corrupting_data(server, command):
    """Whatever the error, a request straddling the end changes nothing inside the export."""
    h = server.connect(strict=0)
    call, _, needs = BEYOND_END[command]
    _needs(h, needs)
    size = h.get_size()
    h.pwrite(pattern(size - 8192, 8192, tag=3), size - 8192)
    try:
        call(h, size - 4096, 8192)
    except nbd.Error:
        pass
    else:
        if command != "read":
            raise AssertionError(
                f"{command} across the end of the export: expected an error, actual success"
            )
        return
    if command in ("write", "write-zeroes"):
        expect_data(
            h.pread(8192, size - 8192),
            pattern(size - 8192, 8192, tag=3),
            f"last 8 KiB after a refused {command} across the end",
        )


@pytest.mark.writes
@pytest.mark.parametrize("command", ["read", "write"])
@spec(
    ERRORS,
    SHOULD,
    quote="It SHOULD return `NBD_EINVAL` if it receives a read or trim request "
    "including one or more sectors beyond the size of the device, or if a read or write "
    "request is not aligned to advertised minimum block sizes.",
)
def test_unaligned_request_gets_einval(start_server, command):
    server = start_server(ServerConfig(minimum_block_size=512))
    h = server.connect(strict=0)
    minimum = h.get_block_size(nbd.SIZE_MINIMUM)
    if minimum <= 1:
        unsupported("the server advertises no minimum block size above 1")
    call = BEYOND_END[command][0]
    expect_nbd_error(
        lambda: call(h, minimum + 1, minimum),
        errno.EINVAL,
        f"{command} at an offset unaligned to {minimum}",
    )


# Flags not documented for the command: bit -> commands it is not valid for.
MISPLACED_FLAGS = {
    "write+REQ_ONE": (lambda h: h.pwrite(b"\0" * 512, 0, nbd.CMD_FLAG_REQ_ONE), None),
    "write+NO_HOLE": (lambda h: h.pwrite(b"\0" * 512, 0, nbd.CMD_FLAG_NO_HOLE), None),
    "read+NO_HOLE": (lambda h: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE), None),
    "read+FAST_ZERO": (lambda h: h.pread(512, 0, nbd.CMD_FLAG_FAST_ZERO), None),
    "flush+REQ_ONE": (lambda h: h.flush(nbd.CMD_FLAG_REQ_ONE), "can_flush"),
    "trim+DF": (lambda h: h.trim(512, 0, nbd.CMD_FLAG_DF), "can_trim"),
}


@pytest.mark.writes
@pytest.mark.parametrize("request_", MISPLACED_FLAGS)
@spec(
    ERRORS,
    SHOULD,
    quote="It also SHOULD return `NBD_EINVAL` if it receives a request with a "
    "flag not explicitly documented as applicable to the given request.",
)
def test_flag_not_documented_for_the_command_gets_einval(server, request_):
    h = server.connect(strict=0)
    call, needs = MISPLACED_FLAGS[request_]
    _needs(h, needs)
    expect_nbd_error(lambda: call(h), errno.EINVAL, request_)


ZERO_LENGTH = {
    "read": (lambda h: h.pread(0, 4096), None),
    "write": (lambda h: h.pwrite(b"", 4096), None),
    "trim": (lambda h: h.trim(0, 4096), "can_trim"),
    "write-zeroes": (lambda h: h.zero(0, 4096), "can_zero"),
    "cache": (lambda h: h.cache(0, 4096), "can_cache"),
}


@pytest.mark.writes
@pytest.mark.parametrize("command", ZERO_LENGTH)
@spec(
    REQUESTS,
    SHOULD,
    quote="The client SHOULD NOT request a read length of 0; the behavior of "
    "a server on such a request is unspecified although the server SHOULD NOT disconnect.",
)
def test_zero_length_request_does_not_disconnect(server, command):
    h = server.connect(strict=0)
    call, needs = ZERO_LENGTH[command]
    _needs(h, needs)
    h.pwrite(pattern(4096, 4096), 4096)
    with contextlib.suppress(nbd.Error):  # any answer will do: the behaviour is unspecified
        call(h)
    expect(
        h.aio_is_ready(),
        f"connection after a zero-length {command}",
        expected="ready",
        actual=h.connection_state(),
    )
    expect_data(h.pread(4096, 4096), pattern(4096, 4096), f"read after a zero-length {command}")


@pytest.mark.writes
@spec(
    "Values / Transmission phase / Request types",
    MUST,
    quote="If it chooses not to, it MUST NOT send any payload for this request.",
)
def test_failed_simple_read_sends_no_payload(server):
    """After a refused read (simple replies), the next reply must parse and carry its data."""
    h = server.connect(strict=0, structured_replies=False)
    size = h.get_size()
    h.pwrite(pattern(0, 65536, tag=4), 0)
    try:
        h.pread(65536, size - 4096)
    except nbd.Error:
        pass
    else:
        unsupported("the server answered the read across the end with data")
    if not h.aio_is_ready():
        unsupported("the server disconnected after the error (which it MAY)")
    expect_data(h.pread(65536, 0), pattern(0, 65536, tag=4), "read after a refused read")


@spec(
    ERRORS,
    SHOULD,
    quote="The server SHOULD NOT return `NBD_EOVERFLOW` except as documented in response to "
    "`NBD_CMD_READ` when `NBD_CMD_FLAG_DF` is supported, or when a command without payload "
    "requests a length larger than an advertised maximum payload length.",
)
def test_oversized_read_with_simple_replies_is_not_eoverflow(server):
    """A READ above the maximum payload with simple replies: DF cannot be in use (it needs
    structured replies), so the refusal, if any, is not NBD_EOVERFLOW (EINVAL is usual)."""
    h = server.connect(strict=0, structured_replies=False)
    maximum = h.get_block_size(nbd.SIZE_MAXIMUM) or (32 << 20)
    length = maximum + 4096
    if length > h.get_size():
        unsupported(f"the export is smaller than the maximum payload ({maximum}) + 4 KiB")
    try:
        h.pread(length, 0)
    except nbd.Error as err:
        expect(
            err.errnum != errno.EOVERFLOW,
            f"error for a {length}-byte READ with simple replies (maximum payload {maximum})",
            expected="any error but EOVERFLOW (75)",
            actual="EOVERFLOW (75)",
        )


@pytest.mark.writes
@spec(
    REQUESTS,
    MUST,
    quote="The server MUST reply with either a simple reply or a structured reply, according to "
    "whether the structured replies have been negotiated using `NBD_OPT_STRUCTURED_REPLY`.",
)
def test_read_after_a_large_refused_write_is_answered(server):
    """A 4 MiB write starting past the end is refused; its payload, which arrives in many
    pieces after the header, is read and dropped, and the READ sent next is answered with its
    data.  A server that stops reading requests once it has skipped the payload never replies
    (a server MAY instead disconnect a client that broke a MUST: unsupported here)."""
    h = server.connect(strict=0)
    size = h.get_size()
    h.pwrite(pattern(0, 4096, tag=15), 0)
    try:
        h.pwrite(b"\x5a" * (4 << 20), size + 4096)
    except nbd.Error:
        pass
    else:
        raise AssertionError("4 MiB write past the end: expected an error, actual success")
    if not h.aio_is_ready():
        unsupported("the server disconnected after the error (which it MAY)")
    expect_data(h.pread(4096, 0), pattern(0, 4096, tag=15), "READ after a refused 4 MiB write")
