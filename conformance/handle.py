"""The libnbd handle a check holds: every wait bounded, every write permitted.

libnbd's synchronous calls (``h.pread``, ``h.flush``, ``h.opt_go``...) wait
for ever on a server that never answers, and nothing in libnbd stops a
check from writing.  :class:`Handle` wraps ``nbd.NBD`` so that checks keep
reading like libnbd's Python API while

- each blocking call has a deadline: when it passes, a :class:`Watchdog`
  shuts the handle's socket down, libnbd returns at once, and the check fails
  with "no reply to NBD_CMD_READ within 10 s" (:class:`ServerTimeout`);
- each request that changes data (``pwrite``, ``trim``, ``zero`` and their
  ``aio_`` forms) first asks the connection's
  :class:`~conformance.guard.WritePermission`, so nothing is sent to a target
  that may not be written;
- each call is written to the check's evidence (:mod:`conformance.evidence`)
  with its arguments and its result or error, so that a failure shows the
  sequence of libnbd calls that led to it.

libnbd releases the GIL while it waits, so the watchdog thread runs while a
call blocks; it needs the socket's descriptor, which is read once after
connecting (``aio_get_fd`` takes the handle's lock, which a blocked call holds).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import nbd

from conformance import evidence
from conformance.guard import UNRESTRICTED, WritePermission
from conformance.target import Target
from conformance.watchdog import WATCHDOG

#: Seconds a check waits for any one reply before the server is deemed stuck.
DEFAULT_TIMEOUT = 10.0


class ServerTimeout(AssertionError):
    """The server did not answer within the deadline."""


#: The blocking calls of libnbd's API that talk to the server, and what they send.
BLOCKING_CALLS = {
    "pread": "NBD_CMD_READ",
    "pread_structured": "NBD_CMD_READ",
    "pwrite": "NBD_CMD_WRITE",
    "flush": "NBD_CMD_FLUSH",
    "trim": "NBD_CMD_TRIM",
    "zero": "NBD_CMD_WRITE_ZEROES",
    "cache": "NBD_CMD_CACHE",
    "block_status": "NBD_CMD_BLOCK_STATUS",
    "opt_go": "NBD_OPT_GO",
    "opt_info": "NBD_OPT_INFO",
    "opt_list": "NBD_OPT_LIST",
    "opt_list_meta_context": "NBD_OPT_LIST_META_CONTEXT",
    "opt_abort": "NBD_OPT_ABORT",
    "shutdown": "NBD_CMD_DISC",
}

#: The calls that send a request changing the export's data.
WRITING_CALLS = {
    "pwrite": "NBD_CMD_WRITE",
    "aio_pwrite": "NBD_CMD_WRITE",
    "trim": "NBD_CMD_TRIM",
    "aio_trim": "NBD_CMD_TRIM",
    "zero": "NBD_CMD_WRITE_ZEROES",
    "aio_zero": "NBD_CMD_WRITE_ZEROES",
}


#: Calls made in polling loops or for bookkeeping: not worth a line of evidence.
UNRECORDED_CALLS = {
    "poll",
    "aio_command_completed",
    "aio_peek_command_completed",
    "aio_get_fd",
    "aio_get_direction",
    "aio_notify_read",
    "aio_notify_write",
    "aio_in_flight",
    "get_handle_name",
}


def _recorded(name: str) -> bool:
    return name not in UNRECORDED_CALLS and not name.startswith("aio_is_")


class Handle:
    """An ``nbd.NBD`` with deadlines on blocking calls and permission for writes.

    Every other attribute is the libnbd handle's own.
    """

    def __init__(
        self,
        h: nbd.NBD,
        *,
        permission: WritePermission = UNRESTRICTED,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.nbd = h
        self.permission = permission
        self.timeout = timeout
        self._fd: int | None = None
        self.name = evidence.connection("nbd")

    def __repr__(self) -> str:
        return f"<Handle {self.nbd.get_handle_name()}>"

    def connected(self, how: str = "") -> None:
        """Note the socket once connected (see the module docstring), and HOW in the evidence."""
        with contextlib.suppress(nbd.Error):
            self._fd = self.nbd.aio_get_fd()
        with contextlib.suppress(nbd.Error):
            evidence.record(
                self.name,
                f"connected{how}: export {self.nbd.get_export_name()!r}, "
                f"{'negotiating' if self.nbd.aio_is_negotiating() else 'ready'}",
            )

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.nbd, name)
        if not callable(attr) or not _recorded(name):
            return attr
        return self._guarded(name, attr, WRITING_CALLS.get(name), BLOCKING_CALLS.get(name))

    def _guarded(
        self, name: str, call: Callable[..., Any], writes: str | None, sends: str | None
    ) -> Callable[..., Any]:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            shown = ", ".join(
                [evidence.summarise(a) for a in args]
                + [f"{k}={evidence.summarise(v)}" for k, v in kwargs.items()]
            )
            try:
                if writes is not None:
                    self.permission.require(writes)
                if sends is None or self._fd is None:
                    result = call(*args, **kwargs)
                else:
                    result = self._bounded(call, sends, args, kwargs)
            except nbd.Error as err:
                evidence.record(self.name, f"{name}({shown}) -> nbd.Error: {err.string}")
                raise
            except Exception as err:
                evidence.record(self.name, f"{name}({shown}) -> {type(err).__name__}: {err}")
                raise
            evidence.record(self.name, f"{name}({shown}) -> {evidence.summarise(result)}")
            return result

        return guarded

    def _bounded(
        self, call: Callable[..., Any], what: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        assert self._fd is not None
        alarm = WATCHDOG.arm(self._fd, self.timeout)
        try:
            result = call(*args, **kwargs)
        except BaseException as err:
            if WATCHDOG.disarm(alarm) and isinstance(err, nbd.Error):
                raise ServerTimeout(
                    f"no reply to {what} within {self.timeout:g} s "
                    "(the suite closed the connection)"
                ) from err
            raise
        if WATCHDOG.disarm(alarm):
            raise ServerTimeout(f"no reply to {what} within {self.timeout:g} s")
        return result


# ------------------------------------------------- opening and waiting


class _Connectable(Protocol):
    def connect(self, n: int = 1, **opts: Any) -> Any: ...


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
