"""Running a scenario: the reference server in a scratch directory, its clients in a shell.

The server starts through the suite's harness (conformance/servers/), without
``--persistent``, so it exits by itself once its last client has left and
every trace line has been written.  The result is normalised: the scratch
directory becomes ``$DIR``, qemu's pointer-derived cookies become ``<c1>``,
``<c2>``... and the closing goodbyes are sorted by connection.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

from capturing import CaptureError
from capturing.scenarios import Scenario
from conformance.servers.peers import ServeOptions, reference_argv
from conformance.servers.process import ServerProcess, ServerStartError, with_pythonpath

REPO = Path(__file__).resolve().parents[3]

SERVER_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable

START_TIMEOUT = 10.0
CLIENT_TIMEOUT = 60.0
EXIT_TIMEOUT = 10.0


def _client_env(workdir: Path) -> dict[str, str]:
    # nbdsh runs "python3 -m nbd": Debian's python3, which has python3-libnbd.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIBNBD_", "PYTHON"))}
    env.update(PATH="/usr/bin:/bin", LC_ALL="C.UTF-8", LANG="C.UTF-8", DIR=str(workdir))
    env["HOME"] = str(workdir)
    return env


def _shell(command: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["/bin/bash", "-c", command],
            cwd=workdir,
            env=_client_env(workdir),
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CaptureError(f"this command did not finish in {CLIENT_TIMEOUT}s:\n{command}") from exc


@dataclasses.dataclass
class RunningServer:
    process: ServerProcess
    socket_path: Path
    trace_path: Path

    def log(self) -> str:
        return self.process.log_text()


def start_server(options: ServeOptions, workdir: Path) -> RunningServer:
    """The reference server as OPTIONS say, run in WORKDIR (where its paths are)."""
    assert options.trace is not None
    argv = reference_argv(options, python=SERVER_PYTHON)
    process = ServerProcess(
        argv, log_path=workdir / "server.log", env=with_pythonpath(REPO), cwd=workdir
    )
    server = RunningServer(process, workdir / options.socket, workdir / options.trace)
    try:
        process.wait_listening(server.socket_path, START_TIMEOUT)
    except ServerStartError as exc:
        process.stop()
        raise CaptureError(str(exc)) from None
    return server


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _display_server(options: ServeOptions) -> str:
    """The server's command line as a reader would type it (the installed script's name)."""
    args = reference_argv(options)[3:]  # what follows "python -m reference_server"
    shown = " ".join(f'"{a}"' if " " in a else a for a in args)
    return f"nbd-reference-server {shown} &"


def run_scenario(scenario: Scenario, workdir: Path) -> dict[str, str]:
    """Run one scenario; return {file name: normalised text}."""
    session: list[str] = []
    if scenario.setup:
        result = _shell("set -e\n" + "\n".join(scenario.setup), workdir)
        if result.returncode:
            raise CaptureError(f"{scenario.name}: setup failed: {result.stderr.strip()}")
        session.extend(f"$ {command}\n" for command in scenario.setup)
        session.append(result.stdout)
    server = start_server(scenario.server, workdir)
    try:
        session.append(f"$ {_display_server(scenario.server)}\n")
        for command in scenario.clients:
            result = _shell(command, workdir)
            if result.returncode:
                raise CaptureError(
                    f"scenario {scenario.name!r}: this command exited with status "
                    f"{result.returncode}:\n{command}\n--- its output:\n"
                    f"{result.stdout}{result.stderr}--- the server's trace:\n"
                    f"{_read(server.trace_path)}--- the server's log:\n{server.log()}"
                )
            session.append(f"$ {command}\n{result.stdout}")
        try:
            server.process.wait_exit(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise CaptureError(
                f"{scenario.name}: the server did not exit after its last client"
            ) from None
    finally:
        server.process.stop()
    trace = sort_goodbyes(server.trace_path.read_text())
    if scenario.qemu_cookies:
        trace = renumber_cookies(trace)
    files = {
        f"{scenario.name}.session": "".join(session),
        f"{scenario.name}.trace": trace,
    }
    return {name: normalise(text, workdir) for name, text in files.items()}


def normalise(text: str, workdir: Path) -> str:
    text = text.replace(str(workdir), "$DIR")
    return text if text.endswith("\n") else text + "\n"


GOODBYE = re.compile(
    r"\[(\d+)\] (C> request NBD_CMD_DISC |C> option NBD_OPT_ABORT |"
    r"S> option reply NBD_OPT_ABORT |-- closing: )"
)


def sort_goodbyes(trace: str) -> str:
    """Sort the final run of goodbye lines by connection number (stable)."""
    lines = trace.splitlines(keepends=True)
    start = len(lines)
    while start > 0 and GOODBYE.match(lines[start - 1]):
        start -= 1
    tail = sorted(lines[start:], key=lambda line: int(GOODBYE.match(line).group(1)))  # type: ignore[union-attr]
    return "".join(lines[:start] + tail)


def renumber_cookies(trace: str) -> str:
    """qemu derives cookies from a pointer: name them <c1>, <c2>... by first use."""
    names: dict[str, str] = {}

    def rename(match: re.Match[str]) -> str:
        value = match.group(1)
        if value == "0":
            return match.group(0)
        names.setdefault(value, f"<c{len(names) + 1}>")
        return f"cookie={names[value]}"

    return re.sub(r"cookie=(\d+)", rename, trace)
