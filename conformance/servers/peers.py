"""The command line of each server the toolkit starts, written once per server.

Every part that starts a server (the conformance profiles, the iotests, the
end-to-end tests, the docs' trace capture, the benchmarks) describes what it
wants in :class:`ServeOptions`, in qemu-nbd's vocabulary, and gets the argv
from one function per peer: :func:`reference_argv`, :func:`qemu_nbd_argv`,
:func:`nbdkit_argv`.  A peer that cannot express an option raises
:class:`PeerCannotDo` rather than silently serving something else.

The reference server is run as ``python -m reference_server``: the suite
never imports it (an oracle must not share code with what it judges).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

#: The checkout holding reference_server/ (run with it first on PYTHONPATH).
REPO_ROOT = Path(__file__).resolve().parents[2]


class PeerCannotDo(ValueError):
    """The server cannot be started with the options asked for."""


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """What a caller asks of a server; None (or False) leaves the server's default.

    ``image`` is a raw file to serve, ``memory`` the size of a RAM disk (an
    int or a size such as ``"1M"``).  ``shared`` is the connection limit (0:
    unlimited).  ``export_name`` ``""`` is passed as the empty name; None
    passes none.  ``tls_only_export`` names a second export, served only over
    TLS, beside ``export_name``, served with or without it (SELECTIVETLS;
    needs ``tls_dir``).  ``trace`` (a wire log) is the reference server's;
    ``cache``, ``aio`` and ``discard`` are qemu-nbd's tuning;
    ``next_data`` offers the reference server's metadata context with 64-bit
    status, ``x-reference:next-data`` (``--next-data``).  ``extra``
    words go last but for the image: a test of a command line itself passes
    its options there.
    """

    socket: str | Path
    image: str | Path | None = None
    memory: int | str | None = None
    read_only: bool = False
    shared: int | None = None
    persistent: bool = False
    export_name: str | None = None
    description: str | None = None
    tls_dir: str | Path | None = None
    minimum_block_size: int = 1
    tls_only_export: str | None = None
    fork: bool = False
    pid_file: str | Path | None = None
    trace: str | Path | None = None
    cache: str | None = None
    aio: str | None = None
    discard: str | None = None
    next_data: bool = False
    extra: tuple[str, ...] = ()


def _refuse(peer: str, o: ServeOptions, unsupported: dict[str, object]) -> None:
    asked = [name for name, default in unsupported.items() if getattr(o, name) != default]
    if asked:
        raise PeerCannotDo(f"{peer} cannot be started with {', '.join(asked)}")


def reference_argv(o: ServeOptions, python: str = sys.executable) -> list[str]:
    """``python -m reference_server [--memory SIZE] [-x NAME] ... -k SOCK [... -f raw IMAGE]``.

    The order is the one the docs show (docs/traces/*.session).
    """
    _refuse("the reference server", o, {"cache": None, "aio": None, "discard": None})
    argv = [python, "-m", "reference_server"]
    if o.memory is not None:
        argv += ["--memory", str(o.memory)]
    if o.export_name is not None:
        argv += ["-x", o.export_name]
    if o.description is not None:
        argv += ["-D", o.description]
    if o.shared is not None:
        argv += ["--shared", str(o.shared)]
    if o.tls_dir is not None:
        argv += ["--tls-creds", str(o.tls_dir)]
    if o.tls_only_export is not None:
        if o.tls_dir is None:
            raise PeerCannotDo("a TLS-only export needs TLS credentials")
        # The second export is as large as the first, in memory.
        size = o.memory if o.memory is not None else "64M"
        name = o.tls_only_export.replace(",", ",,")
        argv += ["--tls=on", "--export", f"name={name},memory={size},tls-only=on"]
    if o.read_only:
        argv.append("-r")
    if o.persistent:
        argv.append("-t")
    if o.minimum_block_size != 1:
        argv.append(f"--minimum-block-size={o.minimum_block_size}")
    if o.next_data:
        argv.append("--next-data")
    if o.fork:
        argv.append("--fork")
    if o.pid_file is not None:
        argv += ["--pid-file", str(o.pid_file)]
    argv += ["-k", str(o.socket)]
    if o.trace is not None:
        argv.append(f"--trace={o.trace}")
    argv += o.extra
    if o.image is not None:
        argv += ["-f", "raw", str(o.image)]
    return argv


def qemu_nbd_argv(o: ServeOptions) -> list[str]:
    """``qemu-nbd -f raw -k SOCK [-x NAME] [-D DESC] [-e N] [--tls-creds ...] [-r] [-t] IMAGE``."""
    _refuse(
        "qemu-nbd",
        o,
        {
            "memory": None,
            "minimum_block_size": 1,
            "trace": None,
            "tls_only_export": None,
            "next_data": False,
        },
    )
    argv = ["qemu-nbd", "-f", "raw", "-k", str(o.socket)]
    if o.export_name is not None:
        argv += ["-x", o.export_name]
    if o.description is not None:
        argv += ["-D", o.description]
    if o.shared is not None:
        argv += ["-e", str(o.shared)]
    if o.tls_dir is not None:
        argv += [
            "--object",
            f"tls-creds-x509,id=tls0,dir={o.tls_dir},endpoint=server",
            "--tls-creds",
            "tls0",
        ]
    if o.read_only:
        argv.append("-r")
    if o.persistent:
        argv.append("-t")
    if o.fork:
        argv.append("--fork")
    if o.pid_file is not None:
        argv.append(f"--pid-file={o.pid_file}")
    for name in ("cache", "aio", "discard"):
        if getattr(o, name) is not None:
            argv.append(f"--{name}={getattr(o, name)}")
    argv += o.extra
    if o.image is not None:
        argv.append(str(o.image))
    return argv


def nbdkit_argv(o: ServeOptions) -> list[str]:
    """``nbdkit -U SOCK -f --exit-with-parent [-r] [--tls...] [filters] memory SIZE|file IMAGE``.

    nbdkit never exits after its last client (so ``persistent`` is required)
    and has no ``--fork`` here.  Connection limits use the limit filter,
    export names the exportname filter (strict, so that other names are
    refused), descriptions the same filter's ``exportdesc=fixed:``, a minimum
    block size the blocksize-policy filter.
    """
    if not o.persistent:
        raise PeerCannotDo("nbdkit never exits after its last client: ask for persistent")
    _refuse(
        "nbdkit",
        o,
        {"fork": False, "pid_file": None, "trace": None, "cache": None, "aio": None,
         "discard": None, "tls_only_export": None, "next_data": False},
    )  # fmt: skip
    if (o.memory is None) == (o.image is None):
        raise PeerCannotDo("nbdkit serves either memory or an image")
    argv = ["nbdkit", "-U", str(o.socket), "-f", "--exit-with-parent"]
    if o.read_only:
        argv.append("-r")
    if o.tls_dir is not None:
        argv += ["--tls=require", f"--tls-certificates={o.tls_dir}"]
    params: list[str] = []
    if o.minimum_block_size != 1:
        # blocksize-policy advertises the sizes and errors what breaks them.
        argv.append("--filter=blocksize-policy")
        params += [
            f"blocksize-minimum={o.minimum_block_size}",
            f"blocksize-preferred={max(4096, o.minimum_block_size)}",
            "blocksize-maximum=33554432",
            "blocksize-error-policy=error",
        ]
    if o.shared:
        argv.append("--filter=limit")
        params.append(f"limit={o.shared}")
    if o.export_name or o.description is not None:
        # nbdkit's -D is for debug flags; descriptions come from a filter.
        argv.append("--filter=exportname")
        if o.export_name:
            params += [
                "exportname-strict=true",
                "exportname-list=explicit",
                f"exportname={o.export_name}",
            ]
        if o.description is not None:
            params.append(f"exportdesc=fixed:{o.description}")
    argv += o.extra
    if o.memory is not None:
        return [*argv, "memory", str(o.memory), *params]
    return [*argv, "file", str(o.image), *params]


#: One command-line builder per peer, by the name every consumer uses.
PEERS: dict[str, Callable[[ServeOptions], list[str]]] = {
    "reference": reference_argv,
    "qemu-nbd": qemu_nbd_argv,
    "nbdkit": nbdkit_argv,
}
