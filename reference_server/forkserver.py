"""``python3 -m reference_server.forkserver``: start reference servers by fork, not by exec.

The conformance suite starts a fresh server for every check, so that no
verdict depends on what an earlier check did to a server.  Most of what a
fresh ``python3 -m reference_server`` costs is the interpreter starting and
importing asyncio and this package: about 0.1 s of CPU, against about 7 ms
for a fork of a process that has already imported them.  This process
imports them once and then forks one child per request; each child runs
:func:`reference_server.cli.main` with the request's arguments, exactly as
``python3 -m reference_server ARGS`` would after its imports, and exits with
its status.  (multiprocessing's "forkserver" start method exists for the
same reason.)  Nothing else runs in this process: no event loop, no thread,
no open socket, so a child starts as clean as a new interpreter would.

The requests, one JSON object per line on standard input, each answered by
one line on standard output:

``{"spawn": [ARG, ...], "log": PATH, "cwd": DIR}`` -> ``{"pid": PID}``
    A server with those arguments, in its own session, standard input
    ``/dev/null``, standard output and error written to PATH (truncated).
``{"poll": PID}`` -> ``{"status": STATUS}``
    STATUS is null while PID runs, else as :attr:`subprocess.Popen.returncode`:
    the exit status, or minus the signal that ended it.
``{"wait": PID, "timeout": SECONDS}`` -> ``{"status": STATUS}``
    The same, after waiting at most SECONDS for PID to end.

A request may carry an ``"id"``; its answer then carries the same, so that
a client interrupted while it waited can tell a late answer from the one it
waits for.  A child is reaped only by a ``poll`` or ``wait`` that sees it ended, so its
PID cannot be reused while the client may still signal it.  A malformed
request gets ``{"error": TEXT}``.  At the end of standard input, and when
the process that started this one dies (``PR_SET_PDEATHSIG``, set by the
client), the children are sent SIGTERM, as each child's own parent-death
signal would.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import select
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from . import cli

PR_SET_PDEATHSIG = 1
_MAIN = os.path.join(os.path.dirname(os.path.abspath(cli.__file__)), "__main__.py")


def _die_with(parent: int) -> None:
    """In a child: SIGTERM when this fork server ends (as the harness does for its servers)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it ended before the signal was armed
        os._exit(1)


def _status(wait_status: int) -> int:
    """A waitpid status as subprocess's returncode: the exit code, or minus the signal."""
    if os.WIFSIGNALED(wait_status):
        return -os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


class ForkServer:
    """The children started so far and the file descriptors a child must not keep."""

    def __init__(self, requests: int, answers: int) -> None:
        self.requests = requests
        self.answers = answers
        #: PID -> a pidfd (readable once the child ends), until the child is reaped.
        self.children: dict[int, int] = {}

    def spawn(self, args: Sequence[str], log: str, cwd: str) -> int:
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        # Held back until the child has dropped this process's SIGTERM handler.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            pid = os.fork()
            if pid == 0:
                self._child(parent, args, log, cwd)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        self.children[pid] = os.pidfd_open(pid)
        return pid

    def _child(self, parent: int, args: Sequence[str], log: str, cwd: str) -> None:
        """Become ``python3 -m reference_server ARGS``; never returns."""
        status = 1
        try:
            os.close(self.requests)
            os.close(self.answers)
            for pidfd in self.children.values():
                os.close(pidfd)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # this process's own handler
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            os.setsid()
            _die_with(parent)
            os.chdir(cwd)
            output = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            nothing = os.open(os.devnull, os.O_RDONLY)
            os.dup2(nothing, 0)
            os.dup2(output, 1)
            os.dup2(output, 2)
            os.close(nothing)
            os.close(output)
            sys.argv = [_MAIN, *args]
            status = cli.main(list(args))
        except SystemExit as exc:  # as the interpreter reports it
            if exc.code is None or isinstance(exc.code, int):
                status = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            # What the interpreter's own exit would do that matters here: flush
            # the output and the log handlers (cli.main has closed the rest).
            with contextlib.suppress(BaseException):
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)

    def status(self, pid: int, timeout: float = 0.0) -> int | None:
        """PID's returncode once it ended (reaping it), None while it runs."""
        pidfd = self.children.get(pid)
        if pidfd is None:
            raise ValueError(f"{pid} is not a running child of this fork server")
        if timeout > 0:
            select.select([pidfd], [], [], timeout)
        reaped, wait_status = os.waitpid(pid, os.WNOHANG)
        if reaped != pid:
            return None
        os.close(self.children.pop(pid))
        return _status(wait_status)

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        if "spawn" in request:
            args = [str(a) for a in request["spawn"]]
            return {"pid": self.spawn(args, str(request["log"]), str(request["cwd"]))}
        if "poll" in request:
            return {"status": self.status(int(request["poll"]))}
        if "wait" in request:
            return {"status": self.status(int(request["wait"]), float(request["timeout"]))}
        raise ValueError(f"unknown request {sorted(request)}")

    def serve(self) -> None:
        """Answer requests until the end of input."""
        for line in _lines(self.requests):
            request: Any = None
            try:
                request = json.loads(line)
                reply = self.answer(request)
            except (ValueError, KeyError, TypeError, OSError) as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            if isinstance(request, dict) and "id" in request:
                reply["id"] = request["id"]
            os.write(self.answers, json.dumps(reply).encode() + b"\n")

    def end_children(self) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _lines(fd: int) -> Iterator[bytes]:
    """The non-empty lines read from FD, until its end."""
    buffer = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        yield from (line for line in lines if line.strip())


def main() -> int:
    # The protocol owns the original stdin and stdout; anything else printed
    # (a warning) goes to stderr, never into an answer.
    requests = os.dup(0)
    answers = os.dup(1)
    nothing = os.open(os.devnull, os.O_RDONLY)
    os.dup2(nothing, 0)
    os.close(nothing)
    os.dup2(2, 1)
    server = ForkServer(requests, answers)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    gc.freeze()  # the imports stay shared with every child instead of being copied
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    finally:
        server.end_children()
    return 0


if __name__ == "__main__":
    sys.exit(main())
