"""The client of the reference server's fork server: one server per check, at a fork's cost.

``python -m reference_server.forkserver`` (see its docstring for the
protocol) imports the reference server once and forks a fresh server for
each request.  The fresh server is exactly what ``python -m reference_server
ARGS`` becomes after its imports: a new process, in its own session, with
nothing shared with the servers before it but the modules it imported, so
that a check's verdict still depends on no other check.  What it saves is
the interpreter's start and the imports, about 0.1 s of CPU per check.

This module only speaks the protocol over the fork server's standard input
and output; like the rest of :mod:`conformance.servers` it never imports
``reference_server``.  A child is a :class:`~conformance.servers.process.ChildProcess`:
the harness signals it by PID and asks the fork server for its exit status
(the fork server reaps it only then, so the PID is never reused under us).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from conformance.servers.process import STOP_TIMEOUT, die_with_parent, stop_process

#: Seconds to wait for an answer to a request that does not itself wait.
ANSWER_TIMEOUT = 30.0


class ForkServerError(RuntimeError):
    """The fork server did not answer, or refused a request."""


class ForkServer:
    """One ``python -m reference_server.forkserver`` process, started on first use.

    PREFIX is the argv prefix it stands for (``[python, "-m",
    "reference_server"]``): it starts argvs that begin with it, in ENV (the
    environment every one of them would have been started in) and CWD.
    """

    def __init__(
        self,
        prefix: Sequence[str],
        *,
        env: Mapping[str, str] | None,
        cwd: str | Path | None,
        log_path: Path,
    ) -> None:
        self.prefix = list(prefix)
        self.env = None if env is None else dict(env)
        self.cwd = cwd
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._sent = 0  # the id of the last request

    def _start(self) -> subprocess.Popen[bytes]:
        if self._process is not None:
            if self._process.poll() is None:
                return self._process
            _close_pipes(self._process)  # it died: its children died with it
        argv = [*self.prefix[:-1], f"{self.prefix[-1]}.forkserver"]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # a check's signals to the suite never reach it
                preexec_fn=die_with_parent,
            )
        self._buffer = b""
        return self._process

    def request(
        self,
        message: Mapping[str, Any],
        timeout: float = ANSWER_TIMEOUT,
        *,
        instance: subprocess.Popen[bytes] | None = None,
    ) -> Any:
        """Send MESSAGE, return the answer (a dict); ForkServerError if none comes.

        With INSTANCE, only that fork server process may answer (a child's
        status is known only to the one that forked it); without, one is
        started if none runs.
        """
        if instance is not None and (instance is not self._process or instance.poll() is not None):
            raise ForkServerError(self._gone())
        process = self._start()
        assert process.stdin is not None and process.stdout is not None
        self._sent += 1
        try:
            process.stdin.write(json.dumps({**message, "id": self._sent}).encode() + b"\n")
            process.stdin.flush()
        except BrokenPipeError:
            raise ForkServerError(self._gone()) from None
        deadline = time.monotonic() + timeout
        while True:
            answer = self._answer(process, deadline, message, timeout)
            # An earlier request interrupted while it waited (a check's
            # timeout) leaves its answer behind: not this one's.
            if answer.get("id") == self._sent:
                break
        if "error" in answer:
            raise ForkServerError(f"the fork server refused {message}: {answer['error']}")
        return answer

    def _answer(
        self,
        process: subprocess.Popen[bytes],
        deadline: float,
        message: Mapping[str, Any],
        timeout: float,
    ) -> Any:
        """The next answer line, decoded."""
        assert process.stdout is not None
        fd = process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                stop_process(process)  # it is wedged: the next request starts another
                raise ForkServerError(f"no answer to {message} within {timeout:g} s")
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise ForkServerError(self._gone())
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _gone(self) -> str:
        try:
            tail = self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            tail = ""
        return f"the reference server's fork server exited: {' '.join(self.prefix)}\n{tail}"

    def spawn(self, argv: Sequence[str], *, log_path: Path, cwd: str | Path | None) -> ForkedChild:
        """Start ARGV (which begins with the prefix) as a child of the fork server."""
        if list(argv[: len(self.prefix)]) != self.prefix:
            raise ValueError(f"{argv} does not start with {self.prefix}")
        cwd = self.cwd if cwd is None else cwd
        answer = self.request(
            {
                "spawn": list(argv[len(self.prefix) :]),
                "log": str(log_path),
                "cwd": str(cwd if cwd is not None else os.getcwd()),
            }
        )
        assert self._process is not None
        return ForkedChild(self, self._process, int(answer["pid"]))

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """End the fork server (it sends SIGTERM to any child still running)."""
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(process, timeout)
        _close_pipes(process)


def _close_pipes(process: subprocess.Popen[bytes]) -> None:
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


class ForkedChild:
    """A server the fork server started: the part of :class:`subprocess.Popen` the harness uses."""

    def __init__(self, forkserver: ForkServer, parent: subprocess.Popen[bytes], pid: int) -> None:
        self._forkserver = forkserver
        self._parent = parent
        self.pid = pid
        self.returncode: int | None = None

    def __repr__(self) -> str:
        return f"<ForkedChild {self.pid} returncode={self.returncode}>"

    def poll(self) -> int | None:
        if self.returncode is None:
            answer = self._forkserver.request({"poll": self.pid}, instance=self._parent)
            self.returncode = answer["status"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The returncode; subprocess.TimeoutExpired if it still runs after TIMEOUT seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = 3600.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(f"PID {self.pid}", timeout or 0.0)
            answer = self._forkserver.request(
                {"wait": self.pid, "timeout": min(left, 10.0)},
                timeout=min(left, 10.0) + 30,
                instance=self._parent,
            )
            self.returncode = answer["status"]
        return self.returncode

    def send_signal(self, sig: int) -> None:
        # The PID is ours until a poll or wait has seen the process end, as
        # long as the fork server that forked it runs (then its children end
        # with it: their parent-death signal).
        if self.returncode is None and self._parent.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
