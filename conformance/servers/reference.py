"""The reference profile: this project's reference server, run as a subprocess.

The suite never imports ``reference_server`` (an oracle must not share code
with what it judges); it runs ``python -m reference_server`` from the
repository root with the interpreter running the suite.
"""

from __future__ import annotations

from pathlib import Path

from conformance.servers.base import Deviation, Profile, ServerConfig
from conformance.servers.peers import REPO_ROOT, reference_argv
from conformance.servers.process import with_pythonpath


class Reference(Profile):
    """``python -m reference_server --memory SIZE -x NAME --shared N [-D DESC] [-r] -t -k SOCK``."""

    name = "reference"
    deviations: tuple[Deviation, ...] = ()
    sets_minimum_block_size = True
    serves_tls_only_exports = True

    def prepare_command(
        self, config: ServerConfig, workdir: Path, socket_path: str, tls_dir: str | None
    ) -> list[str]:
        return reference_argv(self.serve_options(config, socket_path, tls_dir, memory=config.size))

    def env(self) -> dict[str, str]:
        return with_pythonpath(REPO_ROOT)

    def cwd(self) -> str:
        return str(REPO_ROOT)
