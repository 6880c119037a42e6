"""Size constraints in option haggling: NBD_INFO_BLOCK_SIZE sent when they are enforced.

Raw-wire checks (conformance.wire) against a server configured with a
4096-byte minimum block size: a request for NBD_INFO_BLOCK_SIZE is never
answered with NBD_REP_ERR_BLOCK_SIZE_REQD, an enforced constraint is
advertised when asked ("Size constraints"), and a client that never asked
corrupts nothing with an unaligned write.
"""

from __future__ import annotations

import pytest

from conformance.servers.base import ServerConfig
from conformance.spec import MUST, SHOULD, SpecViolation, expect, expect_equal, spec, unsupported
from conformance.wire import Errno, Info, Opt, Rep
from conformance.wire import messages as m
from conformance.wire import session as s

INFO_GO = "Values / Handshake phase / Option types"
REP_INFO = "Values / Handshake phase / Option reply types"


@spec(
    INFO_GO,
    MUST,
    "The server MUST NOT send this error if size constraints were requested with "
    "`NBD_INFO_BLOCK_SIZE` with the `NBD_OPT_INFO` or `NBD_OPT_GO` request.",
)
@pytest.mark.parametrize("minimum", [1, 4096])
def test_block_size_request_never_gets_block_size_reqd(start_server, minimum):
    server = start_server(ServerConfig(minimum_block_size=minimum))
    with s.negotiated(server) as client:
        for option in (Opt.INFO, Opt.GO):
            result = client.option(
                option, m.pack_name_and_infos(s.export_name(server), (Info.BLOCK_SIZE,))
            )
            expect(
                result.type != Rep.ERR_BLOCK_SIZE_REQD,
                f"{option.name} requesting NBD_INFO_BLOCK_SIZE",
                "no NBD_REP_ERR_BLOCK_SIZE_REQD",
                result.describe(),
            )


@spec(
    INFO_GO,
    SHOULD,
    "A server sending an `NBD_REP_ERR_BLOCK_SIZE_REQD` error SHOULD ensure it first sends an "
    "`NBD_INFO_BLOCK_SIZE` information reply in order to help avoid a potentially unnecessary "
    "round trip.",
)
def test_block_size_reqd_comes_after_block_size_info(start_server):
    server = start_server(ServerConfig(minimum_block_size=4096))
    with s.negotiated(server) as client:
        result = client.option(Opt.GO, m.pack_name_and_infos(s.export_name(server), ()))
    if result.type != Rep.ERR_BLOCK_SIZE_REQD:
        unsupported(f"the server does not require NBD_INFO_BLOCK_SIZE ({result.describe()})")
    expect(
        result.block_size is not None,
        "replies before NBD_REP_ERR_BLOCK_SIZE_REQD",
        "an NBD_INFO_BLOCK_SIZE",
        result.describe(),
    )


def _constrained(start_server):
    """A server told to enforce a 4096-byte minimum block size, and what GO says of it."""
    server = start_server(ServerConfig(minimum_block_size=4096))
    return server


def _check_block_size_sent(start_server) -> None:
    """A server configured with a 4096-byte minimum block size: asked in NBD_OPT_INFO and in
    NBD_OPT_GO, it says so (or it does not enforce it: an unaligned READ then succeeds)."""
    server = _constrained(start_server)
    missing = []
    with s.negotiated(server) as client:
        for option in (Opt.INFO, Opt.GO):
            infos = (Info.BLOCK_SIZE,)
            result = client.option(option, m.pack_name_and_infos(s.export_name(server), infos))
            expect_equal(result.type.name, "ACK", f"{option.name} requesting NBD_INFO_BLOCK_SIZE")
            if result.block_size is None:
                missing.append(option.name)
    if not missing:
        return
    what = f"a server that sent no NBD_INFO_BLOCK_SIZE when asked ({', '.join(missing)})"
    try:
        client, _ = s.transmission(server, infos=())
    except m.ProtocolViolation as exc:
        raise SpecViolation(
            what, detail=f"expected no size constraint enforced, actual NBD_OPT_GO refused: {exc}"
        ) from None
    try:
        reply = client.read(1, 512)
    finally:
        client.close()
    expect_equal(reply.error.name, "OK", f"unaligned READ on {what}")


@spec(
    REP_INFO,
    MUST,
    "The server MUST send this info if it is requested and it intends to enforce size "
    "constraints other than the defaults.",
)
def test_enforced_block_size_is_sent_when_requested(start_server):
    _check_block_size_sent(start_server)


@spec(
    "Size constraints",
    SHOULD,
    "A server with size constraints other than the default SHOULD advertise the size "
    "constraints during handshake phase via `NBD_INFO_BLOCK_SIZE` in response to `NBD_OPT_INFO` "
    "or `NBD_OPT_GO`",
)
def test_enforced_block_size_is_advertised(start_server):
    """The same behaviour, graded at the SHOULD of 'Size constraints' (its MUST, 'unless agreed
    out of band', is test_enforced_block_size_is_sent_when_requested)."""
    _check_block_size_sent(start_server)


@spec(
    "Size constraints",
    MUST,
    "When allowing clients that did not negotiate sizing via NBD, a server that enforces "
    "stricter size constraints than the defaults MUST cleanly error commands that fall outside "
    "the constraints without corrupting data; even so, enforcing constraints in this manner may "
    "limit interoperability.",
)
@pytest.mark.writes
def test_unaligned_write_without_size_negotiation_corrupts_nothing(start_server):
    """A server with a 4096-byte minimum block size, a client that never asked for sizes: an
    unaligned WRITE either succeeds (and reads back) or fails and changes nothing."""
    server = _constrained(start_server)
    try:
        client, _ = s.transmission(server, infos=())
    except m.ProtocolViolation as exc:
        unsupported(f"the server does not admit clients that do not negotiate sizes ({exc})")
    try:
        before = b"\x3c" * 8192
        expect_equal(client.write(0, before).error, Errno.OK, "aligned WRITE of 8 KiB")
        patch = b"\xc3" * 1000
        error = client.write(1000, patch).error
        after = client.read(0, 8192)
        expect_equal(after.error, Errno.OK, "aligned READ of 8 KiB")
        data = after.data(0, 8192)
        want = before if error else before[:1000] + patch + before[2000:]
        what = "a refused" if error else "an accepted"
        expect(
            data == want,
            f"data after {what} unaligned WRITE",
            "consistent with its reply",
            "different bytes",
        )
    finally:
        client.close()
