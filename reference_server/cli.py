"""Command line of nbd-reference-server, with qemu-nbd's option names and defaults.

    nbd-reference-server [OPTIONS] FILENAME
    nbd-reference-server [OPTIONS] --memory SIZE
    nbd-reference-server [OPTIONS] ... --export name=NAME,memory=SIZE|file=PATH[,...]

Also runnable from a checkout as ``python3 -m reference_server``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .backends import FileBackend, MemoryBackend
from .backends.base import Backend
from .export_spec import (
    TLS_CHOICES,
    ExportSpec,
    check_tls,
    export_info,
    export_spec_parser,
    tls_option,
)
from .protocol.constants import DEFAULT_MAX_PAYLOAD, MAX_MINIMUM_BLOCK_SIZE, MAX_STRING_LENGTH
from .protocol.export import BlockSizes
from .runtime import EVENT_LOOPS, UnavailableLoop, loop_factory, tune_allocator
from .server import Export, NBDServer, ServerLimits
from .sockets import NBD_PORT, StartupError, listening_sockets
from .trace import TraceLog

PROG = "nbd-reference-server"
# Signals that ask the server to shut down cleanly.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_SUFFIXES = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}


class UsageError(Exception):
    """A bad option or argument: reported in one line, exit status 2."""


def parse_size(text: str) -> int:
    """Parse a size like ``512``, ``64K``, ``1M``, ``2G`` or ``1T`` (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGTPE]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 512, 64K, 1M, 2G, 1T)")
    return int(match.group(1)) << (10 * _SUFFIXES[match.group(2).upper()])


def _nonnegative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return value


def _port(text: str) -> int:
    value = _nonnegative(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port {text} is outside 1-65535")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Serve a raw file, block device or memory over NBD (fixed newstyle).",
        epilog="Options keep qemu-nbd's names and defaults. "
        "Sizes accept K, M, G, T suffixes (powers of 1024).",
    )
    p.add_argument("filename", nargs="?", help="raw file or block device to export")
    p.add_argument(
        "--memory",
        metavar="SIZE",
        type=parse_size,
        help="export sparse memory of SIZE bytes instead of a file",
    )
    p.add_argument("-r", "--read-only", action="store_true", help="export read-only")
    p.add_argument(
        "-e",
        "--shared",
        metavar="NUM",
        type=_nonnegative,
        default=1,
        help="allow NUM simultaneous clients (default 1; 0 = unlimited); "
        "NBD_FLAG_CAN_MULTI_CONN is advertised when NUM is not 1",
    )
    p.add_argument(
        "-t",
        "--persistent",
        action="store_true",
        help="keep serving after the last client disconnects",
    )
    p.add_argument(
        "-x",
        "--export-name",
        metavar="NAME",
        default="",
        help="export name (default: the empty default export)",
    )
    p.add_argument(
        "-D",
        "--description",
        metavar="TEXT",
        default="",
        help="export description, shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION",
    )
    p.add_argument(
        "--export",
        dest="exports",
        metavar="name=NAME,memory=SIZE|file=PATH[,...]",
        action="append",
        default=[],
        type=export_spec_parser(parse_size),
        help="serve one more export; also description=TEXT, read-only=on, tls-only=on",
    )
    p.add_argument("-k", "--socket", metavar="PATH", help="listen on a Unix socket")
    p.add_argument(
        "-p", "--port", type=_port, default=None, help=f"listen on a TCP port (default {NBD_PORT})"
    )
    p.add_argument(
        "-b",
        "--bind",
        metavar="ADDRESS",
        default=None,
        help="address to listen on (default 0.0.0.0)",
    )
    p.add_argument("-f", "--format", default="raw", help="image format: only raw is served")
    p.add_argument(
        "--fork",
        action="store_true",
        help="run in the background; the command returns once the server listens",
    )
    p.add_argument("--pid-file", metavar="FILE", help="write the server's PID to FILE")
    p.add_argument(
        "--tls-creds",
        metavar="DIR",
        help="require TLS with ca-cert.pem, server-cert.pem, server-key.pem from DIR",
    )
    p.add_argument(
        "--tls",
        choices=TLS_CHOICES,
        default=None,
        help="off: no TLS; require: TLS before any option (FORCEDTLS, the default with "
        "--tls-creds); on: TLS at the client's choice, required by TLS-only exports "
        "(SELECTIVETLS)",
    )
    p.add_argument(
        "--tls-only",
        action="store_true",
        help="with --tls=on: serve the export of FILENAME or --memory only over TLS",
    )
    p.add_argument(
        "--tls-verify-peer",
        action="store_true",
        help="with --tls-creds: require a client certificate signed by ca-cert.pem",
    )
    p.add_argument(
        "--next-data",
        action="store_true",
        help="also offer the metadata context x-reference:next-data: for a hole, the offset "
        "where data next begins (64-bit status: needs extended headers)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log connections to stderr")
    p.add_argument(
        "--trace",
        metavar="FILE",
        nargs="?",
        const="-",
        help="write one annotated line per protocol message to FILE (default stderr)",
    )
    p.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    limits = p.add_argument_group("limits (not in qemu-nbd)")
    limits.add_argument(
        "--handshake-timeout",
        metavar="SECONDS",
        type=float,
        default=10.0,
        help="close clients that have not finished negotiating (default 10; 0 = never)",
    )
    limits.add_argument(
        "--handshake-progress-timeout",
        metavar="SECONDS",
        type=float,
        default=5.0,
        help="close negotiating clients that take longer to answer the server "
        "(default 5; 0 = never)",
    )
    limits.add_argument(
        "--max-handshaking",
        metavar="NUM",
        type=_nonnegative,
        default=64,
        help="clients in negotiation at once; beyond it new connections wait in the "
        "listen backlog (default 64)",
    )
    limits.add_argument(
        "--max-inflight",
        metavar="NUM",
        type=_nonnegative,
        default=64,
        help="requests in flight per connection before reading pauses (default 64)",
    )
    limits.add_argument(
        "--max-inflight-bytes",
        metavar="SIZE",
        type=parse_size,
        default=64 << 20,
        help="request and reply bytes held in memory, server-wide (default 64M)",
    )
    limits.add_argument(
        "--minimum-block-size",
        metavar="SIZE",
        type=parse_size,
        default=1,
        help="advertise and enforce this alignment; clients must then ask for "
        "NBD_INFO_BLOCK_SIZE (default 1)",
    )
    limits.add_argument(
        "--max-payload",
        metavar="SIZE",
        type=parse_size,
        default=DEFAULT_MAX_PAYLOAD,
        help="maximum request payload (default 32M)",
    )
    p.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="asyncio",
        help="asyncio's own loop (default), or uvloop if it is installed (faster)",
    )
    return p


def _check(args: argparse.Namespace) -> None:
    if args.format != "raw":
        raise UsageError(f"format {args.format!r} is not supported: this server serves raw only")
    if (args.filename is None) == (args.memory is None):
        raise UsageError("give exactly one of FILENAME or --memory SIZE")
    if args.socket and (args.port is not None or args.bind is not None):
        raise UsageError("-k/--socket cannot be combined with -p/--port or -b/--bind")
    for spec in export_specs(args):
        if len(spec.name.encode()) > MAX_STRING_LENGTH:
            raise UsageError(f"export name is longer than {MAX_STRING_LENGTH} bytes")
        if len(spec.description.encode()) > MAX_STRING_LENGTH:
            raise UsageError(f"description is longer than {MAX_STRING_LENGTH} bytes")
    problem = check_tls(
        tls_option(args.tls, bool(args.tls_creds)), bool(args.tls_creds), export_specs(args)
    )
    if problem is not None:
        raise UsageError(problem)
    minimum = args.minimum_block_size
    if minimum < 1 or minimum & (minimum - 1) or minimum > MAX_MINIMUM_BLOCK_SIZE:
        raise UsageError("--minimum-block-size must be a power of 2 up to 64K")
    if args.max_payload < max(4096, minimum) or args.max_payload > 0xFFFFFFFF:
        raise UsageError("--max-payload must be at least 4K (and the minimum block size)")
    if args.tls_verify_peer and not args.tls_creds:
        raise UsageError("--tls-verify-peer needs --tls-creds")
    try:
        args.loop_factory = loop_factory(args.event_loop)
    except UnavailableLoop as exc:
        raise UsageError(str(exc)) from None


def export_specs(args: argparse.Namespace) -> list[ExportSpec]:
    """The export of FILENAME or --memory (with -x, -D, -r, --tls-only), then each --export."""
    first = ExportSpec(
        name=args.export_name,
        memory=args.memory,
        file=args.filename,
        description=args.description,
        read_only=args.read_only,
        tls_only=args.tls_only,
    )
    return [first, *args.exports]


def open_backend(spec: ExportSpec) -> Backend:
    if spec.memory is not None:
        try:
            return MemoryBackend(spec.memory)
        except OSError as exc:
            raise StartupError(f"--memory: {exc.strerror or exc}") from None
    assert spec.file is not None
    try:
        return FileBackend(spec.file, read_only=spec.read_only)
    except OSError as exc:
        raise StartupError(f"cannot open {spec.file!r}: {exc.strerror or exc}") from None


def tls_context(directory: str, verify_peer: bool) -> ssl.SSLContext:
    """x509 credentials laid out as qemu's tls-creds-x509 expects them."""
    d = Path(directory)
    cert, key, ca = d / "server-cert.pem", d / "server-key.pem", d / "ca-cert.pem"
    for f in (cert, key):
        if not f.is_file():
            raise StartupError(f"--tls-creds: {f} is missing")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # "TLS versions": TLS 1.2 or later.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if verify_peer:
            if not ca.is_file():
                raise StartupError(f"--tls-verify-peer: {ca} is missing")
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"--tls-creds: cannot load credentials from {d}: {exc}") from None
    return ctx


def _daemonize() -> int:
    """Fork; the parent waits until the child listens, then exits. Returns the pipe fd."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            ready = pipe.read(1)
        os._exit(0 if ready == b"1" else 1)
    os.close(read_end)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    return write_end


def _export(args: argparse.Namespace, spec: ExportSpec, backend: Backend) -> Export:
    """SPEC served from BACKEND, with the server-wide options of ARGS."""
    sizes = BlockSizes(
        args.minimum_block_size, max(4096, args.minimum_block_size), args.max_payload
    )
    tls = tls_option(args.tls, bool(args.tls_creds))
    info = export_info(
        spec, backend, shared=args.shared, sizes=sizes, tls=tls, next_data=args.next_data
    )
    return Export(info, backend)


async def _serve(
    args: argparse.Namespace,
    exports: list[Export],
    sockets: list[socket.socket],
    tls: ssl.SSLContext | None,
    trace: TraceLog | None,
    ready_fd: int | None,
) -> None:
    limits = ServerLimits(
        handshake_timeout=args.handshake_timeout,
        handshake_progress_timeout=args.handshake_progress_timeout,
        max_handshaking=args.max_handshaking or 1 << 30,
        max_inflight_requests=args.max_inflight or 1 << 30,
        max_inflight_bytes=args.max_inflight_bytes,
    )
    server = NBDServer(
        exports,
        shared=args.shared,
        persistent=args.persistent,
        tls=tls,
        limits=limits,
        trace=trace,
    )
    await server.listen(sockets)
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        server.request_shutdown(f"received {sig.name}")

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    # Held back since before the sockets listened (see main): one that came
    # meanwhile is delivered now, to the handler, as a clean shutdown.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if args.pid_file:
        Path(args.pid_file).write_text(f"{os.getpid()}\n")
    if ready_fd is not None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
        if not args.verbose:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
    logging.getLogger("reference_server").info("serving %s", _describe(args, exports))
    try:
        await server.done.wait()
    finally:
        # A signal during loop teardown would otherwise hit a closed wakeup fd.
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)


def _describe(args: argparse.Namespace, exports: list[Export]) -> str:
    size = exports[0].backend.size
    what = f"memory of {size} bytes" if args.memory is not None else repr(args.filename)
    where = args.socket or f"{args.bind or '0.0.0.0'}:{args.port or NBD_PORT}"
    more = f" and {len(exports) - 1} more export(s)" if len(exports) > 1 else ""
    return f"{what} as export {args.export_name!r}{more} on {where}"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _check(args)
    except UsageError as exc:
        print(f"{PROG}: {exc}\nTry '{PROG} --help' for more information.", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format=f"{PROG}: %(message)s"
    )
    sockets: list[socket.socket] = []
    trace_stream = None
    try:
        tls = tls_context(args.tls_creds, args.tls_verify_peer) if args.tls_creds else None
        exports = [_export(args, spec, open_backend(spec)) for spec in export_specs(args)]
        # A client (or a test harness) may send SIGTERM as soon as the socket
        # listens: hold it until the handler that shuts down cleanly is in.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        sockets = listening_sockets(args)
        if args.trace:
            trace_stream = sys.stderr if args.trace == "-" else open(args.trace, "w")  # noqa: SIM115
        ready_fd = _daemonize() if args.fork else None
        trace = TraceLog(trace_stream) if trace_stream else None
        tune_allocator()
        with asyncio.Runner(loop_factory=args.loop_factory) as runner:
            runner.run(_serve(args, exports, sockets, tls, trace, ready_fd))
    except StartupError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if args.socket and sockets:
            with contextlib.suppress(OSError):
                os.unlink(args.socket)
        if args.pid_file and sockets:
            with contextlib.suppress(OSError):
                os.unlink(args.pid_file)
        if trace_stream is not None and trace_stream is not sys.stderr:
            trace_stream.close()
    return 0
