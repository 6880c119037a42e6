"""The fixtures checks ask for: the server under test, in the configuration they need.

``start_server(ServerConfig(...))`` is the one way a check reaches a server:
the profile starts a fresh one (or, for ``--uri``, hands over the running one
when it already is in that configuration), every connection to it carries the
check's write permission (:mod:`conformance.guard`), and a server that ends
during the check fails it.  What they need of the run (the profile, whether
the target may be written) the plugin leaves in the config's stash under
:data:`RUN`, so that this module does not import the plugin that loads it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from conformance.guard import WritePermission
from conformance.liveness import ServerCrashed
from conformance.servers import Profile, ProfileCannotDo, Server, ServerConfig
from conformance.spec import unsupported
from conformance.tlsutil import generate as generate_credentials


class RunState(Protocol):
    """What the fixtures need of the run (the plugin object provides it)."""

    profile: Profile
    writes_allowed: bool
    wide_context: str | None


#: The run's state, set by the plugin at configure time.
RUN = pytest.StashKey[RunState]()
#: Per check: the servers start_server started for it.
SERVERS = pytest.StashKey[list[Server]]()
#: Per check: whether it reached for the target (asked start_server for it).
TOUCHED = pytest.StashKey[bool]()


def short_tmpdir(prefix: str) -> Path:
    """A fresh directory with a short path (Unix socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("TMPDIR", "/tmp")))


@pytest.fixture(scope="session")
def nbd_profile(pytestconfig: pytest.Config) -> Profile:
    """The profile of the server under test."""
    return pytestconfig.stash[RUN].profile


@pytest.fixture(scope="session")
def tls_credentials() -> Iterator[Callable[[], str]]:
    """A callable returning a directory of TLS credentials, made on first use."""
    made: list[Path] = []

    def get() -> str:
        if not made:
            made.append(generate_credentials(short_tmpdir("nbd-tls-")).directory)
        return str(made[0])

    yield get
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_server(
    request: pytest.FixtureRequest, nbd_profile: Profile, tls_credentials: Callable[[], str]
) -> Iterator[Callable[..., Server]]:
    """``start_server(ServerConfig(...)) -> Server``: a fresh server, stopped at teardown.

    Skips the check with the reason when the profile cannot be put in that
    configuration.  Every connection to the server carries the check's write
    permission; a server that ends during the check fails it.
    """
    started: list[tuple[Server, Path | None]] = []
    permission = WritePermission(
        marked=request.node.get_closest_marker("writes") is not None,
        target_writable=request.config.stash[RUN].writes_allowed,
        check=request.node.nodeid,
    )
    servers = request.node.stash.setdefault(SERVERS, [])

    def start(config: ServerConfig | None = None) -> Server:
        config = ServerConfig() if config is None else config
        request.node.stash[TOUCHED] = True  # probe the target after this check
        try:
            if config.minimum_block_size != 1 and not nbd_profile.sets_minimum_block_size:
                raise ProfileCannotDo("no way to set a minimum block size")
            if config.tls_only_export is not None and not nbd_profile.serves_tls_only_exports:
                raise ProfileCannotDo("no way to serve a TLS-only export beside a plain one")
            nbd_profile.check_config(config)
        except ProfileCannotDo as err:
            pytest.skip(f"{nbd_profile.name} cannot be configured with {config.describe()}: {err}")
        uses_tls = config.uses_tls_credentials and nbd_profile.starts_servers
        tls_dir = tls_credentials() if uses_tls else None
        workdir = short_tmpdir("nbd-") if nbd_profile.starts_servers else None
        try:
            server = nbd_profile.start(config, workdir or Path("."), tls_dir)
        except BaseException:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        server.write_permission = permission
        started.append((server, workdir))
        servers.append(server)
        return server

    yield start
    ended = [how for server, _ in started if (how := server.unexpected_exit()) is not None]
    for server, workdir in reversed(started):
        server.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    if ended:
        raise ServerCrashed(ended[0])


@pytest.fixture(scope="session")
def wide_context(pytestconfig: pytest.Config) -> str:
    """A metadata context with 64-bit status the server offers (``--wide-context``, or the
    profile's); the check is UNSUPPORTED when there is none.  Ask for it before ``server``,
    so that no server is started for nothing."""
    name = pytestconfig.stash[RUN].wide_context
    if name is None:
        unsupported(
            "no metadata context with 64-bit status is known for this server "
            "(--wide-context=NAME names one)"
        )
    return name


@pytest.fixture
def server(start_server: Callable[..., Server]) -> Server:
    """A fresh writable server allowing several connections."""
    return start_server(ServerConfig())


@pytest.fixture
def ro_server(start_server: Callable[..., Server]) -> Server:
    """A fresh read-only server."""
    return start_server(ServerConfig(read_only=True))


@pytest.fixture
def nbd_handle(server: Server) -> Any:
    """One libnbd handle connected to ``server``."""
    return server.connect()
