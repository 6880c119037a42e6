"""What every server-under-test profile shares: configurations, servers, processes.

A *profile* knows how to start one kind of server (qemu-nbd, nbdkit, ...)
in a :class:`ServerConfig`; a :class:`Server` is one running instance the
checks talk to, through libnbd handles (:meth:`Server.connect`) or raw
sockets (:meth:`Server.open_socket`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conformance.guard import READ_ONLY, UNRESTRICTED, WritePermission
from conformance.handle import close_handle, open_handle
from conformance.servers.peers import ServeOptions
from conformance.servers.process import (
    ChildProcess,
    ServerProcess,
    Spawn,
    StartedServer,
    describe_exit,
)
from conformance.target import Target, unix_target

MiB = 1024 * 1024
DEFAULT_SIZE = 64 * MiB


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """A configuration a check needs the server in.

    ``shared`` is the connection limit: None means "the profile's default
    allowing several connections", an int is that exact limit, 0 unlimited.
    """

    size: int = DEFAULT_SIZE
    read_only: bool = False
    shared: int | None = None
    export_name: str = ""
    description: str | None = None
    tls: bool = False
    # A minimum block size to advertise and enforce ("Size constraints"); 1 is
    # the default constraint, which every server can do.
    minimum_block_size: int = 1
    # SELECTIVETLS ("TLS support / Server-side requirements"): besides
    # ``export_name``, served with or without TLS at the client's choice, an
    # export of this name served only over TLS.  None: no such export.
    tls_only_export: str | None = None

    @property
    def uses_tls_credentials(self) -> bool:
        """Whether the server needs TLS credentials (FORCEDTLS or SELECTIVETLS)."""
        return self.tls or self.tls_only_export is not None

    def describe(self) -> str:
        """Only the fields that differ from the default, for skip reasons."""
        default = ServerConfig()
        parts = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        ]
        return ", ".join(parts) or "the default configuration"


@dataclasses.dataclass(frozen=True)
class Deviation:
    """A known, recorded departure of a third-party server from the spec.

    The check named ``check`` (function name, or the full parametrised
    name) is expected to fail against that profile: it is reported as an
    expected failure (xfail, strict) with the reason and the spec section.
    ``intermittent`` marks a deviation that shows only some of the time (a
    race in the server): its check may then pass without failing the run.
    """

    check: str
    section: str
    reason: str
    intermittent: bool = False


class ProfileCannotDo(Exception):
    """The profile cannot put its server in the requested configuration."""


class Server:
    """A server the checks talk to (started by the suite or not).

    Where it is reached is its :class:`~conformance.target.Target`; what it
    adds is bookkeeping: the configuration it was started in, the write
    permission of the running check, and every connection made through it,
    closed at teardown.
    """

    def __init__(
        self,
        *,
        target: Target,
        config: ServerConfig,
        started_by_suite: bool = True,
        write_permission: WritePermission | None = None,
        profile: str = "",
    ) -> None:
        self.target = target
        self.config = config
        self.started_by_suite = started_by_suite
        # Set for each check by the start_server fixture; until then a server
        # the suite did not start is never written to.
        if write_permission is None:
            write_permission = UNRESTRICTED if started_by_suite else READ_ONLY
        self.write_permission = write_permission
        self.profile = profile
        self._handles: list[Any] = []
        self._sockets: list[socket.socket] = []

    def __repr__(self) -> str:
        return f"<Server {self.profile} {self.uri}>"

    # Where the server is, as the checks have always asked for it.
    @property
    def uri(self) -> str:
        return self.target.uri

    @property
    def export_name(self) -> str:
        return self.target.export_name

    @property
    def socket_path(self) -> str | None:
        return self.target.socket_path

    @property
    def address(self) -> tuple[str, int] | None:
        return self.target.address

    @property
    def tls_dir(self) -> str | None:
        return self.target.tls_dir

    @property
    def tls(self) -> bool:
        return self.target.tls

    def open_socket(self, timeout: float = 10.0) -> socket.socket:
        """A raw connected socket (for the raw-wire client), closed at teardown."""
        sock = self.target.open_socket(timeout)
        self._sockets.append(sock)
        return sock

    def connect(self, n: int = 1, **opts: Any) -> Any:
        """N connected libnbd handles (one handle when N == 1), closed at teardown.

        Options: ``export_name`` (default the server's), ``meta_contexts``
        (names to request, e.g. ``["base:allocation"]``), ``strict`` (libnbd
        strict-mode bits), ``structured_replies`` (default True),
        ``request_block_size`` (default True), ``full_info`` (default True:
        ask for NAME and DESCRIPTION), ``tls`` (default: as the server),
        ``opt_mode`` (stop in option negotiation), ``timeout`` (seconds).
        """
        handles = []
        for _ in range(n):
            opts.setdefault("handle_name", f"conformance-{self.profile}")
            h = open_handle(self.target, permission=self.write_permission, **opts)
            self._handles.append(h)
            handles.append(h)
        return handles[0] if n == 1 else handles

    def close_clients(self) -> None:
        """Disconnect every handle and socket opened through this server."""
        while self._handles:
            close_handle(self._handles.pop())
        while self._sockets:
            with contextlib.suppress(OSError):
                self._sockets.pop().close()

    def stop(self) -> None:
        self.close_clients()

    def expect_exit(self) -> None:
        """The running check is about to make the server exit (a shutdown check)."""

    def unexpected_exit(self, grace: float = 0.0) -> str | None:
        """How the server ended, if it did so on its own; None while it runs.

        GRACE: seconds to wait for a server that is ending to be gone (when the
        check failed, its failure may be the first sign of a crash).  Only
        servers the suite started can say (see :class:`LocalServer`).
        """
        return None


#: Linux task flags (include/linux/sched.h) of a process on its way out.
_PF_EXITING = 0x4
_PF_DUMPCORE = 0x200
_PF_SIGNALED = 0x400


def _ending(pid: int) -> bool:
    """True while PID is exiting: killed by a signal, dumping core, closing its files."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    # After the command: state (0), ppid, pgrp, session, tty, tpgid, flags (6).
    return fields[0] in ("Z", "X") or bool(
        int(fields[6]) & (_PF_EXITING | _PF_DUMPCORE | _PF_SIGNALED)
    )


class LocalServer(Server):
    """A server process the suite started (:mod:`conformance.servers.process`); stopped by PID.

    With ``pid_file`` the process daemonises (nbd-server): it is followed, and
    stopped, through the PID file it writes.  With ``spawn`` it is started by
    a fork server that holds ENV already (the reference profile's).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        workdir: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        pid_file: Path | None = None,
        spawn: Spawn | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._stopping = False
        self._exit_expected = False
        self.workdir = workdir
        self.pid_file = pid_file
        # Its own session: a check's signals to the suite never reach it (a
        # fork server starts every child in its own session).
        self.server_process: StartedServer
        if spawn is not None:
            process = spawn(argv, log_path=log_path, cwd=cwd)
            self.server_process = StartedServer(argv, process, log_path=log_path)
        else:
            self.server_process = ServerProcess(
                argv, log_path=log_path, env=env, cwd=cwd, new_session=True
            )

    @property
    def argv(self) -> list[str]:
        return self.server_process.argv

    @property
    def log_path(self) -> Path:
        return self.server_process.log_path

    @property
    def process(self) -> ChildProcess:
        """The process the suite started (for a daemon: its launcher)."""
        return self.server_process.process

    @property
    def daemon_pid(self) -> int | None:
        return self.server_process.daemon_pid

    def log_tail(self, limit: int = 2000) -> str:
        return self.server_process.log_tail(limit)

    def is_running(self) -> bool:
        return self.server_process.running()

    def exit_status(self) -> int | None:
        """The process's returncode (negative: killed by that signal), once it ended."""
        return self.server_process.exit_status()

    def expect_exit(self) -> None:
        self._exit_expected = True

    def unexpected_exit(self, grace: float = 0.0) -> str | None:
        if self._stopping or self._exit_expected:
            return None
        # A crash still under way (a core being dumped) is given GRACE seconds to end.
        deadline = time.monotonic() + grace
        while self.is_running():
            if time.monotonic() >= deadline or not _ending(self.server_process.pid):
                return None
            time.sleep(0.02)
        tail = self.log_tail().rstrip()
        log = f"; its log ends:\n{tail}" if tail else "; its log is empty"
        return f"{describe_exit(self.exit_status())} during the check{log}"

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Wait until the Unix socket listens; fail with the server's output if it died."""
        assert self.socket_path is not None
        deadline = time.monotonic() + timeout
        if self.pid_file is not None:
            self.server_process.follow_daemon(self.pid_file, timeout)
        left = max(0.1, deadline - time.monotonic())
        self.server_process.wait_listening(self.socket_path, left)

    def stop(self) -> None:
        self._stopping = True
        super().stop()
        self.server_process.stop()


class Profile:
    """One kind of server under test; subclasses say how to start it."""

    name = ""
    #: Known deviations of this server from the spec (expected failures).
    deviations: tuple[Deviation, ...] = ()
    #: Whether the suite starts the server itself (False for --uri).
    starts_servers = True
    #: Whether the server can be told to advertise a minimum block size above 1.
    sets_minimum_block_size = False
    #: Whether the server can serve a TLS-only export beside a plain one (SELECTIVETLS).
    serves_tls_only_exports = False
    #: A metadata context the server offers whose status needs 64 bits (the
    #: EXTENDED_HEADERS extension), for the checks of test_wide_contexts.py;
    #: None: it offers none (``--wide-context`` names one for another server).
    wide_context: str | None = None

    def check_config(self, config: ServerConfig) -> None:
        """Raise ProfileCannotDo if the server cannot be put in CONFIG."""

    def running_server(self) -> Server | None:
        """The one server that runs for the whole session, for a profile that starts none.

        The plugin probes it after every check (:mod:`conformance.liveness`).
        """
        return None

    def close(self) -> None:
        """At the end of the run: release what the profile kept between checks."""

    def export_name(self, config: ServerConfig) -> str:
        return config.export_name

    def prepare_command(
        self, config: ServerConfig, workdir: Path, socket_path: str, tls_dir: str | None
    ) -> list[str]:
        """Write what the server needs into WORKDIR (an image, a config file), return its argv."""
        raise NotImplementedError

    def serve_options(
        self, config: ServerConfig, socket_path: str, tls_dir: str | None, **peer: Any
    ) -> ServeOptions:
        """CONFIG in the harness's terms, for a built-in peer's command line.

        Always persistent: checks connect more than once.  ``shared=None``
        becomes 0, unlimited (qemu-nbd's own default would be 1).  PEER adds
        what only that server needs (an image file, a RAM disk's size).
        """
        return ServeOptions(
            socket=socket_path,
            read_only=config.read_only,
            shared=0 if config.shared is None else config.shared,
            persistent=True,
            export_name=config.export_name,
            description=config.description,
            tls_dir=tls_dir if config.uses_tls_credentials else None,
            minimum_block_size=config.minimum_block_size,
            tls_only_export=config.tls_only_export,
            **peer,
        )

    def env(self) -> dict[str, str] | None:
        return None

    def cwd(self) -> str | None:
        return None

    def launch(self, argv: list[str], **kwargs: Any) -> LocalServer:
        """Start the process; a profile whose server daemonises returns its own kind."""
        return LocalServer(argv, **kwargs)

    def start(self, config: ServerConfig, workdir: Path, tls_dir: str | None) -> Server:
        """Start a fresh server in CONFIG on a fresh Unix socket in WORKDIR."""
        self.check_config(config)
        socket_path = str(workdir / "nbd.sock")
        export = self.export_name(config)
        argv = self.prepare_command(config, workdir, socket_path, tls_dir)
        server = self.launch(
            argv,
            workdir=workdir,
            log_path=workdir / "server.log",
            env=self.env(),
            cwd=self.cwd(),
            target=unix_target(
                export,
                socket_path,
                config.tls,
                tls_dir=tls_dir if config.uses_tls_credentials else None,
            ),
            config=config,
            profile=self.name,
        )
        try:
            server.wait_ready()
        except BaseException:
            server.stop()
            raise
        return server
