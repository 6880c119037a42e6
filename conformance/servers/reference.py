"""The reference profile: this project's reference server, run as a subprocess.

The suite never imports ``reference_server`` (an oracle must not share code
with what it judges); it runs ``python -m reference_server`` from the
repository root with the interpreter running the suite.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from conformance.servers.base import Deviation, Profile, ServerConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


class Reference(Profile):
    """``python -m reference_server -k SOCK -t -e N [-r] [-x NAME] [-D DESC] --memory SIZE``."""

    name = "reference"
    deviations: tuple[Deviation, ...] = ()
    sets_minimum_block_size = True

    def command(
        self, config: ServerConfig, workdir: Path, socket_path: str, tls_dir: str | None
    ) -> list[str]:
        shared = 0 if config.shared is None else config.shared
        argv = [
            sys.executable,
            "-m",
            "reference_server",
            "-k",
            socket_path,
            "-t",
            "-e",
            str(shared),
            "-x",
            config.export_name,
            "--memory",
            str(config.size),
        ]
        if config.minimum_block_size != 1:
            argv.append(f"--minimum-block-size={config.minimum_block_size}")
        if config.read_only:
            argv.append("-r")
        if config.description is not None:
            argv += ["-D", config.description]
        if config.tls:
            assert tls_dir is not None
            argv.append(f"--tls-creds={tls_dir}")
        return argv

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
        return env

    def cwd(self) -> str:
        return str(REPO_ROOT)
