"""libnbd handles for the checks: connecting with a deadline, aio helpers.

libnbd's synchronous calls wait for ever on a server that never answers;
a conformance suite must not.  Connecting and the aio helpers here poll with
a deadline, the handles they return bound every blocking call
(:class:`~conformance.handle.Handle`), and a timeout becomes
:class:`ServerTimeout` (an AssertionError: a server that hangs fails the
check, it does not hang the run).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Protocol

import nbd

from conformance.guard import UNRESTRICTED, WritePermission
from conformance.handle import DEFAULT_TIMEOUT, Handle, ServerTimeout
from conformance.target import Target


class _Connectable(Protocol):
    def connect(self, n: int = 1, **opts: Any) -> Any: ...


__all__ = [
    "DEFAULT_TIMEOUT",
    "ServerTimeout",
    "close_handle",
    "open_handle",
    "try_connect",
    "wait_all",
    "wait_for",
]


def _poll_until(h: Any, done: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServerTimeout(f"{what}: no answer from the server within {timeout:g}s")
        h.poll(max(1, int(min(remaining, 1.0) * 1000)))


def open_handle(
    target: Target,
    *,
    permission: WritePermission = UNRESTRICTED,
    handle_name: str = "conformance",
    export_name: str | None = None,
    meta_contexts: Iterable[str] = (),
    strict: int | None = None,
    structured_replies: bool = True,
    request_block_size: bool = True,
    full_info: bool = True,
    tls: bool | None = None,
    opt_mode: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    command_timeout: float = DEFAULT_TIMEOUT,
) -> Handle:
    """One libnbd handle connected to TARGET (see :meth:`Server.connect` for the options).

    Its blocking calls wait at most COMMAND_TIMEOUT seconds for a reply, and
    its writes need PERMISSION (the running check's, on a server's handles).
    """
    h = nbd.NBD()
    h.set_handle_name(handle_name)
    h.set_export_name(target.export_name if export_name is None else export_name)
    for name in meta_contexts:
        h.add_meta_context(name)
    h.set_request_structured_replies(structured_replies)
    h.set_request_block_size(request_block_size)
    h.set_full_info(full_info)
    if strict is not None:
        h.set_strict_mode(strict)
    if opt_mode:
        h.set_opt_mode(True)
    use_tls = target.tls if tls is None else tls
    if use_tls:
        h.set_tls(nbd.TLS_REQUIRE)
        if target.tls_dir:
            h.set_tls_certificates(target.tls_dir)
    else:
        h.set_tls(nbd.TLS_DISABLE)
    if target.socket_path is not None:
        h.aio_connect_unix(target.socket_path)
    else:
        assert target.address is not None
        h.aio_connect_tcp(target.address[0], str(target.address[1]))
    if opt_mode:
        _poll_until(h, lambda: h.aio_is_negotiating() or h.aio_is_ready(), timeout, "handshake")
    else:
        _poll_until(h, h.aio_is_ready, timeout, "handshake")
    handle = Handle(h, permission=permission, timeout=command_timeout)
    asked = [
        f"meta contexts {list(meta_contexts)}" if meta_contexts else "",
        "" if structured_replies else "no structured replies",
        f"strict mode {strict:#x}" if strict is not None else "",
        "TLS" if use_tls else "",
        "option mode" if opt_mode else "",
    ]
    how = ", ".join(a for a in asked if a)
    handle.connected(f" ({how})" if how else "")
    return handle


def close_handle(h: Any) -> None:
    """Disconnect softly when possible; a dead handle is simply dropped."""
    try:
        if h.aio_is_ready():
            h.shutdown()
        elif h.aio_is_negotiating():
            h.opt_abort()
    except nbd.Error:
        pass


def wait_for(h: Any, cookie: int, timeout: float = DEFAULT_TIMEOUT, what: str = "command") -> None:
    """Wait for one aio command; raise its nbd.Error if the server rejected it."""
    _poll_until(h, lambda: h.aio_command_completed(cookie), timeout, what)


def wait_all(
    h: Any, cookies: Iterable[int], timeout: float = DEFAULT_TIMEOUT, what: str = "commands"
) -> list[nbd.Error | None]:
    """Wait for every aio command; return the error (or None) of each, in order."""
    pending = list(cookies)
    results: dict[int, nbd.Error | None] = {}
    deadline = time.monotonic() + timeout
    while len(results) < len(pending):
        for cookie in pending:
            if cookie in results:
                continue
            try:
                if h.aio_command_completed(cookie):
                    results[cookie] = None
            except nbd.Error as err:
                results[cookie] = err
        if len(results) == len(pending):
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServerTimeout(
                f"{what}: {len(pending) - len(results)} of {len(pending)} "
                f"requests unanswered after {timeout:g}s"
            )
        h.poll(max(1, int(min(remaining, 1.0) * 1000)))
    return [results[c] for c in pending]


def try_connect(server: _Connectable, timeout: float = 3.0, **opts: Any) -> Handle | str:
    """A connected handle, or the reason a connection could not be made in time."""
    try:
        return server.connect(timeout=timeout, **opts)
    except ServerTimeout as err:
        return str(err)
    except nbd.Error as err:
        return f"connection refused: {err}"
