"""The reference profile: this project's reference server, run as a subprocess.

The suite never imports ``reference_server`` (an oracle must not share code
with what it judges); it runs ``python -m reference_server`` from the
repository root with the interpreter running the suite.  Each check's server
is forked by ``python -m reference_server.forkserver``
(:mod:`conformance.servers.forkserver`), started once per test process: the
same fresh server per check, without an interpreter start and its imports
for each.  ``NBD_REFERENCE_FORKSERVER=0`` starts each one with exec instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conformance.servers.base import Deviation, LocalServer, Profile, ServerConfig
from conformance.servers.forkserver import ForkServer
from conformance.servers.peers import REPO_ROOT, reference_argv
from conformance.servers.process import with_pythonpath

#: Set to 0 to start every reference server with a fresh interpreter.
FORKSERVER_ENV = "NBD_REFERENCE_FORKSERVER"
#: Variables that change from check to check and that no server reads: pytest
#: names the running check and its phase here.
_PER_CHECK = frozenset({"PYTEST_CURRENT_TEST"})


def _differ(a: Mapping[str, str] | None, b: Mapping[str, str] | None) -> bool:
    """Whether environments A and B differ in a variable a server could read."""
    a, b = a or {}, b or {}
    return any(a.get(k) != b.get(k) for k in (a.keys() | b.keys()) - _PER_CHECK)


class Reference(Profile):
    """``python -m reference_server --memory SIZE -x NAME --shared N [-D DESC] [-r] -t -k SOCK``.

    Always with ``--next-data`` too: the context with 64-bit status of
    test_wide_contexts.py.
    """

    name = "reference"
    deviations: tuple[Deviation, ...] = ()
    sets_minimum_block_size = True
    serves_tls_only_exports = True
    # Offered on every server the profile starts (--next-data), so the whole
    # suite runs against a server with a context it must hold back from
    # clients without extended headers.
    wide_context = "x-reference:next-data"

    def __init__(self) -> None:
        self._forkserver: ForkServer | None = None
        self._forkserver_dir: Path | None = None

    def prepare_command(
        self, config: ServerConfig, workdir: Path, socket_path: str, tls_dir: str | None
    ) -> list[str]:
        options = self.serve_options(
            config, socket_path, tls_dir, memory=config.size, next_data=True
        )
        return reference_argv(options)

    def env(self) -> dict[str, str]:
        return with_pythonpath(REPO_ROOT)

    def cwd(self) -> str:
        return str(REPO_ROOT)

    def launch(self, argv: list[str], **kwargs: Any) -> LocalServer:
        if os.environ.get(FORKSERVER_ENV, "1") == "0":
            return LocalServer(argv, **kwargs)
        if self._forkserver is not None and _differ(self._forkserver.env, kwargs["env"]):
            # The environment changed since the fork server started (a check
            # set a variable): its children would not see it, an exec would.
            return LocalServer(argv, **kwargs)
        if self._forkserver is None:
            self._forkserver_dir = Path(tempfile.mkdtemp(prefix="nbd-forkserver-"))
            self._forkserver = ForkServer(
                argv[:3],
                env=kwargs["env"],
                cwd=kwargs["cwd"],
                log_path=self._forkserver_dir / "forkserver.log",
            )
        kwargs["env"] = None  # the fork server's, which every server shares
        return LocalServer(argv, spawn=self._forkserver.spawn, **kwargs)

    def close(self) -> None:
        if self._forkserver is not None:
            self._forkserver.close()
            self._forkserver = None
        if self._forkserver_dir is not None:
            shutil.rmtree(self._forkserver_dir, ignore_errors=True)
            self._forkserver_dir = None
