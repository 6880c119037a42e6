"""Sessions with a server under test: connecting, negotiating, and the health probe.

The checks of the raw-wire files start from here.  Against a server that
requires TLS (an ``nbds`` URI or a TLS configuration) the helpers upgrade with
NBD_OPT_STARTTLS first, so that the option checks also run against such
servers, inside TLS.

:func:`assert_still_serving` is the probe every hostile check ends with: after
whatever the check did, a new well-behaved client is served.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from conformance.spec import SpecViolation, expect_equal, unsupported
from conformance.tlsutil import client_context

from . import messages as m
from .client import Disconnected, WireClient
from .constants import BASE_ALLOCATION, Cmd, Errno, Info, Opt, Rep
from .messages import ExportInfo, ProtocolViolation
from .results import OptionResult

PROBE_TIMEOUT = 10.0


def tls_context(server: Any) -> ssl.SSLContext | None:
    """The client TLS context for *server*, or None when it does not use TLS."""
    if not getattr(server, "tls", False):
        return None
    if server.tls_dir is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return client_context(server.tls_dir)


def export_name(server: Any) -> bytes:
    return str(server.export_name).encode("utf-8")


def connect(server: Any, *, timeout: float = PROBE_TIMEOUT) -> WireClient:
    """A raw connection; nothing read or sent yet."""
    return WireClient.connect(server, timeout=timeout)


@contextlib.contextmanager
def in_clear(server: Any, flags: int | None = None) -> Iterator[WireClient]:
    """Greeting and client flags done (fixed newstyle unless FLAGS says otherwise), no TLS."""
    client = connect(server)
    try:
        client.negotiate(flags)
        yield client
    finally:
        client.close()


def option_payload(option: Opt, name: bytes) -> bytes:
    """The smallest valid payload of OPTION about export NAME (base:allocation for contexts)."""
    if option in (Opt.INFO, Opt.GO):
        return m.pack_name_and_infos(name)
    if option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
        return m.pack_meta_context_query(name, (BASE_ALLOCATION.encode(),))
    return b""


def negotiated(
    server: Any, *, flags: int | None = None, timeout: float = PROBE_TIMEOUT
) -> WireClient:
    """Greeting and client flags done, TLS started if the server requires it: options next."""
    client = connect(server, timeout=timeout)
    client.negotiate(flags)
    ctx = tls_context(server)
    if ctx is not None:
        result = client.starttls(ctx)
        if not result.ok:
            raise ProtocolViolation(f"STARTTLS: expected NBD_REP_ACK, actual {result.describe()}")
    return client


def transmission(
    server: Any,
    *,
    structured: bool = False,
    extended: bool = False,
    meta_contexts: tuple[bytes, ...] = (),
    infos: tuple[int, ...] = (Info.BLOCK_SIZE,),
    timeout: float = PROBE_TIMEOUT,
) -> tuple[WireClient, ExportInfo]:
    """A client in the transmission phase after a well-behaved NBD_OPT_GO, and the export."""
    client, go = transmission_and_go(
        server,
        structured=structured,
        extended=extended,
        meta_contexts=meta_contexts,
        infos=infos,
        timeout=timeout,
    )
    export = go.export
    if export is None:
        client.close()
        raise ProtocolViolation(f"NBD_OPT_GO succeeded without NBD_INFO_EXPORT: {go.describe()}")
    return client, export


def transmission_and_go(
    server: Any,
    *,
    structured: bool = False,
    extended: bool = False,
    meta_contexts: tuple[bytes, ...] = (),
    infos: tuple[int, ...] = (Info.BLOCK_SIZE,),
    timeout: float = PROBE_TIMEOUT,
) -> tuple[WireClient, OptionResult]:
    """:func:`transmission`, with all of NBD_OPT_GO's result (block sizes, name...)."""
    client = connect(server, timeout=timeout)
    try:
        go = client.open_export(
            export_name(server),
            tls=tls_context(server),
            structured=structured,
            extended=extended,
            meta_contexts=meta_contexts,
            infos=infos,
        )
    except BaseException:
        client.close()
        raise
    return client, go


def transmission_with(server: Any, replies: str) -> tuple[WireClient, ExportInfo]:
    """:func:`transmission` with ``simple`` or ``structured`` REPLIES.

    UNSUPPORTED when the server does not negotiate NBD_OPT_STRUCTURED_REPLY
    (structured replies are a SHOULD: "Values / Handshake phase / Option types").
    """
    try:
        return transmission(server, structured=replies == "structured")
    except ProtocolViolation as exc:
        if replies == "structured" and "STRUCTURED_REPLY" in str(exc):
            unsupported("the server does not negotiate NBD_OPT_STRUCTURED_REPLY")
        raise


@dataclass
class ReplyModeSession:
    """A client in transmission in one reply mode, what NBD_OPT_GO said, base:allocation's ID."""

    client: WireClient
    go: OptionResult
    export: ExportInfo
    #: The ID the server gave base:allocation, None where not asked for or not offered.
    context_id: int | None


@contextlib.contextmanager
def reply_mode(server: Any, mode: str, *, meta: bool = True) -> Iterator[ReplyModeSession]:
    """A client in transmission with ``simple``, ``structured`` or ``extended`` replies.

    The checks that look at every reply path start here: the mode's option
    (NBD_OPT_STRUCTURED_REPLY or NBD_OPT_EXTENDED_HEADERS) must be ACKed, or
    the check is UNSUPPORTED when the server answers NBD_REP_ERR_UNSUP; with
    META (and a mode with reply payloads), base:allocation is selected where
    offered; then NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE must be ACKed.
    """
    client = negotiated(server)
    try:
        if mode != "simple":
            extended = mode == "extended"
            option = "NBD_OPT_EXTENDED_HEADERS" if extended else "NBD_OPT_STRUCTURED_REPLY"
            result = client.extended_headers() if extended else client.structured_reply()
            if result.type == Rep.ERR_UNSUP:
                unsupported(f"the server does not support {option}")
            expect_equal(result.type.name, "ACK", f"reply to {option}")
        name = export_name(server)
        context_id = None
        if meta and mode != "simple":
            selected = client.set_meta_context(name, (BASE_ALLOCATION.encode(),))
            context_id = selected.contexts.get(BASE_ALLOCATION)
        go = client.go(name, (Info.BLOCK_SIZE,))
        expect_equal(go.type.name, "ACK", "reply to NBD_OPT_GO")
        assert go.export is not None
        yield ReplyModeSession(client, go, go.export, context_id)
    finally:
        client.close()


def require_tls_context(server: Any) -> ssl.SSLContext:
    """The client TLS context of a server configured for TLS."""
    ctx = tls_context(server)
    if ctx is None:
        raise ValueError(f"{server!r} does not use TLS")
    return ctx


def assert_still_serving(
    server: Any, after: str, *, expect: tuple[int, bytes] | None = None
) -> None:
    """Fail unless a new well-behaved client completes GO and a 4 KiB READ.

    *after* names the hostile interaction for the message; *expect* is an
    (offset, bytes) pair that must read back unchanged (data intact).
    """
    what = f"a well-behaved client after {after}"
    offset, wanted = expect if expect is not None else (0, b"")
    length = max(len(wanted), 4096)
    try:
        client, export = transmission(server)
    except (Disconnected, ProtocolViolation, OSError) as exc:
        raise SpecViolation(what, detail=f"expected to be served, actual {exc!r}") from None
    try:
        length = min(length, max(export.size - offset, 0))
        reply = client.request(Cmd.READ, offset, length)
        if reply.error != Errno.OK:
            raise SpecViolation(what, f"READ of {length} bytes succeeding", reply.error.name)
        data = reply.data(offset, length)
        if wanted and data[: len(wanted)] != wanted:
            raise SpecViolation(what, detail="expected the data written before, actual different")
    except (Disconnected, ProtocolViolation, OSError) as exc:
        detail = f"expected a READ reply, actual {exc!r}\nwire log:\n{client.transcript()}"
        raise SpecViolation(what, detail=detail) from None
    finally:
        client.disconnect()


def assert_still_answers(client: WireClient, after: str, *, cookie: int | None = None) -> None:
    """Fail unless the same connection answers a plain 512-byte READ: AFTER cost nothing else.

    *after* names what the check sent before, for the message; *cookie* is the
    READ's cookie (the client's next one by default).
    """
    what = f"a READ on the same connection after {after}"
    try:
        reply = client.reply(client.send_request(Cmd.READ, 0, 512, cookie=cookie))
    except (Disconnected, TimeoutError, ProtocolViolation) as exc:
        raise SpecViolation(what, detail=f"expected a reply, actual {exc}") from None
    expect_equal(reply.error, Errno.OK, what)


def wait_for_close(client: WireClient, timeout: float) -> tuple[str, bytes]:
    """How the server ends the connection within *timeout*, and what it sent before.

    ``"closed"`` (a TCP close, after a TLS close_notify when TLS runs),
    ``"no close_notify"`` (TLS runs and the TCP connection closed without it),
    ``"reset"`` or ``"open"`` (still open at the deadline).
    """
    sock = client.sock
    if isinstance(sock, ssl.SSLSocket):
        sock.suppress_ragged_eofs = False  # type: ignore[attr-defined]  # bare TCP close raises
    sock.settimeout(timeout)
    data = b""
    try:
        while piece := sock.recv(65536):
            data += piece
    except TimeoutError:
        return "open", data
    except ssl.SSLEOFError:
        return "no close_notify", data
    except (ConnectionResetError, ssl.SSLError, OSError):
        return "reset", data
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(client.timeout)
    return "closed", data
