#!/usr/bin/env python3
"""Capture the protocol exchanges the documentation shows, from the real server.

Every exchange in the protocol tour is produced here, never typed by hand:
each scenario starts the reference server with ``--trace`` on a Unix socket
in a temporary directory, drives it with a real client (nbdinfo, nbdsh,
qemu-io), stops it, and writes two files:

``NAME.session``
    the shell commands, as a reader would type them, and what they printed;
``NAME.trace``
    the server's annotated wire log (``--trace``), one line per message.

``raw-*.hex`` files are annotated hex dumps of real bytes: a raw socket
session with the server whose bytes are cut into the fields the
specification lays out ("Protocol phases" and "Values").

Normalisation: the temporary directory becomes ``$DIR``; qemu's cookies,
derived from a memory address, become ``<c1>``, ``<c2>``... in order of
first use; and when several connections say goodbye at the end
(``NBD_CMD_DISC`` and ``NBD_OPT_ABORT`` get no reply the client waits for),
the order in which the server happens to read them is not the clients'
order, so those last lines are sorted by connection.  Everything else is
what the programs printed.

Usage::

    python3 docs/traces/capture.py            # rewrite docs/traces/*
    python3 docs/traces/capture.py --check    # exit 1, with a diff, on drift
    python3 docs/traces/capture.py --only tls --out /tmp/t

The docs' Sphinx extension (docs/_ext/nbddocs/) runs ``--check`` at build
time, so a change of the server's behaviour that the docs do not reflect
fails ``tox -e docs``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:  # run as a script: the server harness lives in conformance/
    sys.path.insert(1, str(REPO))

from conformance.servers.peers import ServeOptions, reference_argv  # noqa: E402
from conformance.servers.process import (  # noqa: E402
    ServerProcess,
    ServerStartError,
    with_pythonpath,
)

SERVER_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
SUFFIXES = (".session", ".trace", ".hex")
START_TIMEOUT = 10.0
CLIENT_TIMEOUT = 60.0
EXIT_TIMEOUT = 10.0

# The commands run in the scratch directory that holds the socket.
URI = "nbd+unix:///?socket=nbd.sock"


def served(**options: Any) -> ServeOptions:
    """A 1 MiB RAM disk on ``nbd.sock``, tracing into ``server.trace`` (in the scratch dir)."""
    return ServeOptions(socket="nbd.sock", trace="server.trace", memory="1M", **options)


class CaptureError(Exception):
    """A scenario could not be captured (a tool missing, a client failed...)."""


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One server, the shell commands that drive it, and how to normalise the result.

    ``setup`` commands run before the server starts (e.g. creating TLS
    credentials); ``clients`` run while it serves.  The server is started
    without ``--persistent``, so it exits by itself once its last client has
    left, which guarantees that every trace line has been written.
    """

    name: str
    server: ServeOptions
    clients: tuple[str, ...]
    setup: tuple[str, ...] = ()
    qemu_cookies: bool = False


def nbdsh(*statements: str, uri: str | None = URI, flags: str = "") -> str:
    """An ``nbdsh [-u URI] -c STATEMENT...`` command line, one statement a line."""
    head = " ".join(["nbdsh", *([flags] if flags else []), *([f"-u '{uri}'"] if uri else [])])
    return " \\\n    ".join([head, *(f"-c '{s}'" for s in statements)])


# TLS credentials laid out as qemu's tls-creds-x509 (and --tls-creds) expect them:
# a CA, and a server certificate signed by it.  One script; shown a line at a time.
TLS_SETUP = (
    "mkdir pki && cd pki",
    "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1"
    " -subj /CN=nbd-docs-ca -keyout ca-key.pem -out ca-cert.pem",
    "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    " -subj /CN=localhost -keyout server-key.pem -out server.csr",
    "echo subjectAltName=DNS:localhost > san.cnf",
    "openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial"
    " -days 1 -extfile san.cnf -out server-cert.pem",
    "cd ..",
)

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "handshake",
        served(),
        (f"nbdinfo '{URI}'",),
    ),
    Scenario(
        "options",
        served(export_name="disk", description="a teaching disk"),
        (
            nbdsh(
                'for name in ("missing", "disk"):\n'
                "    h.set_export_name(name)\n"
                "    try:\n"
                "        h.opt_info()\n"
                '        print(name, "size", h.get_size())\n'
                "    except nbd.Error as e:\n"
                '        print(name, "refused:", e.string)',
                'h.opt_list(lambda name, desc: print("export", repr(name), repr(desc)))',
                'h.opt_list_meta_context(lambda ctx: print("context", ctx))',
                'h.add_meta_context("base:allocation")',
                "h.opt_go()",
                'print("serving", h.get_export_name(), h.can_meta_context("base:allocation"))',
                "h.shutdown()",
                uri="nbd+unix:///disk?socket=nbd.sock",
                flags="--opt-mode",
            ),
        ),
    ),
    Scenario(
        "transmission",
        served(),
        (
            nbdsh(
                "h.set_request_structured_replies(False)",
                'h.connect_uri("nbd+unix:///?socket=nbd.sock")',
                'h.pwrite(b"hello, NBD!\\n", 0, nbd.CMD_FLAG_FUA)',
                "print(h.pread(12, 0))",
                "h.flush()",
                "h.trim(65536, 65536)",
                "h.zero(4096, 8192)",
                "h.set_strict_mode(0)",
                "try:\n    h.pread(512, h.get_size())\n"
                'except nbd.Error as e:\n    print("read past the end:", e.string)',
                "h.shutdown()",
                uri=None,
            ),
        ),
    ),
    Scenario(
        "qemu-io",
        served(),
        (
            f"qemu-io -f raw '{URI}'"
            " -c 'write -q -P 0xab 0 64k' -c 'read -q -P 0xab 0 64k' -c 'flush'",
        ),
        qemu_cookies=True,
    ),
    Scenario(
        "structured",
        served(),
        (
            nbdsh(
                'h.pwrite(b"x" * 4096, 0)',
                "buf = h.pread(12288, 0)",
                'print(buf[:4], buf.count(b"x"), buf.count(0))',
                "h.set_strict_mode(0)",
                "try:\n    h.pread(512, h.get_size())\n"
                'except nbd.Error as e:\n    print("read past the end:", e.string)',
                "h.shutdown()",
            ),
        ),
    ),
    Scenario(
        "block-status",
        served(),
        (
            nbdsh(
                'h.pwrite(b"x" * 196608, 131072)',
                "h.zero(65536, 262144)",
                "def show(metacontext, offset, entries, err):\n"
                "    for length, flags in zip(entries[0::2], entries[1::2]):\n"
                '        print(f"{offset:>7} +{length:<7} flags={flags}")\n'
                "        offset += length",
                "h.block_status(1048576, 0, show)",
                'print("with NBD_CMD_FLAG_REQ_ONE:")',
                "h.block_status(1048576, 0, show, nbd.CMD_FLAG_REQ_ONE)",
                "h.shutdown()",
                flags="--base-allocation",
            ),
        ),
    ),
    Scenario(
        "multi-conn",
        served(shared=3),
        (
            nbdsh(
                "a, b, c = (nbd.NBD() for _ in range(3))",
                'for x in (a, b, c):\n    x.connect_uri("nbd+unix:///?socket=nbd.sock")',
                'print("can_multi_conn:", a.can_multi_conn())',
                'a.pwrite(b"written on a", 0)',
                "b.flush()",
                "print(c.pread(12, 0))",
                "for x in (a, b, c):\n    x.shutdown()",
                uri=None,
            ),
        ),
    ),
    Scenario(
        "single-conn",
        served(),
        (
            nbdsh(
                "a, b = nbd.NBD(), nbd.NBD()",
                'a.connect_uri("nbd+unix:///?socket=nbd.sock")',
                'print("can_multi_conn:", a.can_multi_conn())',
                "try:\n"
                '    b.connect_uri("nbd+unix:///?socket=nbd.sock")\n'
                "except nbd.Error as e:\n"
                '    print("second connection:", e.string)',
                "a.shutdown()",
                uri=None,
            ),
        ),
    ),
    Scenario(
        "tls",
        served(shared=2, tls_dir="pki"),
        (
            nbdsh(
                "h.set_opt_mode(True)",
                "h.set_tls(nbd.TLS_DISABLE)",
                'h.connect_uri("nbd+unix:///?socket=nbd.sock")',
                'try:\n    h.opt_go()\nexcept nbd.Error as e:\n    print("without TLS:", e.string)',
                "t = nbd.NBD()",
                't.set_tls_certificates("pki")',
                't.connect_uri("nbds+unix:///?socket=nbd.sock")',
                'print("with TLS:", t.get_protocol(), t.get_tls_negotiated(), t.get_size())',
                "h.opt_abort()",
                "t.shutdown()",
                uri=None,
            ),
        ),
        setup=TLS_SETUP,
    ),
)


# ----------------------------------------------------------------- running


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


# ------------------------------------------------------- annotated hex dumps
#
# The layouts below are written from proto.md ("Protocol phases / Handshake /
# Newstyle negotiation", "Fixed newstyle negotiation", "Transmission" and
# "Values"); they do not come from the server's code.

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

HANDSHAKE_FLAGS = {1: "NBD_FLAG_FIXED_NEWSTYLE", 2: "NBD_FLAG_NO_ZEROES"}
CLIENT_FLAGS = {1: "NBD_FLAG_C_FIXED_NEWSTYLE", 2: "NBD_FLAG_C_NO_ZEROES"}
TRANSMISSION_FLAGS = {
    1 << i: "NBD_FLAG_" + n
    for i, n in enumerate(
        [
            "HAS_FLAGS",
            "READ_ONLY",
            "SEND_FLUSH",
            "SEND_FUA",
            "ROTATIONAL",
            "SEND_TRIM",
            "SEND_WRITE_ZEROES",
            "SEND_DF",
            "CAN_MULTI_CONN",
            "SEND_RESIZE",
            "SEND_CACHE",
            "SEND_FAST_ZERO",
            "BLOCK_STATUS_PAYLOAD",
        ]
    )
}
OPTIONS = {7: "NBD_OPT_GO", 8: "NBD_OPT_STRUCTURED_REPLY"}
REPLIES = {1: "NBD_REP_ACK", 3: "NBD_REP_INFO"}
INFOS = {
    0: "NBD_INFO_EXPORT",
    1: "NBD_INFO_NAME",
    2: "NBD_INFO_DESCRIPTION",
    3: "NBD_INFO_BLOCK_SIZE",
}
COMMANDS = {0: "NBD_CMD_READ", 1: "NBD_CMD_WRITE", 2: "NBD_CMD_DISC"}
CHUNK_TYPES = {1: "NBD_REPLY_TYPE_OFFSET_DATA", 2: "NBD_REPLY_TYPE_OFFSET_HOLE"}
REPLY_FLAGS = {1: "NBD_REPLY_FLAG_DONE"}


def flags_of(names: dict[int, str]) -> Callable[[object], str]:
    """Show a bit field with the names of its bits."""

    def show(value: object) -> str:
        assert isinstance(value, int)
        parts = [name for bit, name in names.items() if value & bit]
        unknown = value & ~sum(names)
        if unknown:
            parts.append(hex(unknown))
        return "|".join(parts) or "0"

    return show


def enum_of(names: dict[int, str]) -> Callable[[object], str]:
    """Show a number with its name."""

    def show(value: object) -> str:
        assert isinstance(value, int)
        return f"{names.get(value, '?')} ({value})"

    return show


# A field: (name, struct format or byte count, how to show the value).
Field = tuple[str, str | int, Callable[[object], str]]


def _hex(value: object) -> str:
    return f"{value:#x}" if isinstance(value, int) else repr(value)


def _magic(value: object) -> str:
    assert isinstance(value, int)
    raw = value.to_bytes(8, "big").lstrip(b"\0")
    text = raw.decode("ascii", "replace")
    return f"{value:#x}" + (f' "{text}"' if text.isprintable() and len(raw) == 8 else "")


def _dec(value: object) -> str:
    return str(value)


def _text(value: object) -> str:
    return repr(bytes(value).decode()) if isinstance(value, bytes) else repr(value)


class Dump:
    """Accumulates annotated messages, one block per message."""

    def __init__(self) -> None:
        self.blocks: list[str] = []

    def message(self, direction: str, title: str, data: bytes, fields: list[Field]) -> None:
        lines = [f"{direction}> {title} ({len(data)} bytes)"]
        at = 0
        for name, layout, show in fields:
            if isinstance(layout, int):
                size = layout
                value: object = data[at : at + size]
            else:
                size = struct.calcsize(layout)
                (value,) = struct.unpack_from(layout, data, at)
            raw = data[at : at + size]
            shown = raw[:8].hex(" ") + (" .." if size > 8 else "")
            lines.append(f"  {at:04x}  {shown:<26} {name}: {show(value)}")
            at += size
        if at != len(data):
            raise CaptureError(f"{title}: {len(data) - at} bytes not accounted for")
        self.blocks.append("\n".join(lines))

    def text(self) -> str:
        return "\n\n".join(self.blocks) + "\n"


class RawClient:
    """Just enough of a client to show real bytes: reads exactly, with a timeout."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(CLIENT_TIMEOUT)
        self.sock.connect(str(path))

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise CaptureError(f"the server closed the connection ({len(data)}/{n} bytes)")
            data += chunk
        return data

    def send(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        return data

    def close(self) -> None:
        self.sock.close()


def _option_reply(client: RawClient, dump: Dump) -> int:
    header = client.recv(20)
    _, _, reply, length = struct.unpack(">QIII", header)
    payload = client.recv(length)
    fields: list[Field] = [
        ("magic", ">Q", _hex),
        ("option", ">I", enum_of(OPTIONS)),
        ("reply type", ">I", enum_of(REPLIES)),
        ("length", ">I", _dec),
    ]
    title = f"option reply {REPLIES.get(reply, reply)}"
    if reply == 3:
        (info,) = struct.unpack_from(">H", payload)
        title += f" {INFOS.get(info, info)}"
        fields.append(("information type", ">H", enum_of(INFOS)))
        if info == 0:
            fields += [
                ("export size", ">Q", _dec),
                ("transmission flags", ">H", flags_of(TRANSMISSION_FLAGS)),
            ]
        elif info in (1, 2):
            fields.append(("text", length - 2, _text))
        elif info == 3:
            fields += [
                ("minimum block size", ">I", _dec),
                ("preferred block size", ">I", _dec),
                ("maximum block size", ">I", _dec),
            ]
    elif length:
        fields.append(("data", length, _hex))
    dump.message("S", title, header + payload, fields)
    return int(reply)


def raw_session(workdir: Path) -> dict[str, str]:
    """Greeting, NBD_OPT_GO, a write and a read, byte by byte."""
    server = start_server(served(export_name="disk"), workdir)
    handshake, transmission = Dump(), Dump()
    try:
        client = RawClient(server.socket_path)
        try:
            handshake.message(
                "S",
                "greeting",
                client.recv(18),
                [
                    ("magic", ">Q", _magic),
                    ("option magic", ">Q", _magic),
                    ("handshake flags", ">H", flags_of(HANDSHAKE_FLAGS)),
                ],
            )
            handshake.message(
                "C",
                "client flags",
                client.send(struct.pack(">I", 3)),
                [("client flags", ">I", flags_of(CLIENT_FLAGS))],
            )
            option_header: list[Field] = [
                ("magic", ">Q", _magic),
                ("option", ">I", enum_of(OPTIONS)),
                ("length", ">I", _dec),
            ]
            handshake.message(
                "C",
                "option NBD_OPT_STRUCTURED_REPLY",
                client.send(struct.pack(">QII", IHAVEOPT, 8, 0)),
                option_header,
            )
            _option_reply(client, handshake)
            name = b"disk"
            data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, 3)
            handshake.message(
                "C",
                "option NBD_OPT_GO",
                client.send(struct.pack(">QII", IHAVEOPT, 7, len(data)) + data),
                [
                    *option_header,
                    ("export name length", ">I", _dec),
                    ("export name", len(name), _text),
                    ("number of information requests", ">H", _dec),
                    ("information request", ">H", enum_of(INFOS)),
                ],
            )
            for _ in range(8):
                if _option_reply(client, handshake) != 3:
                    break
            _transmission(client, transmission)
        finally:
            client.close()
        server.process.wait_exit(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CaptureError("raw session: the server did not exit after its client") from None
    finally:
        server.process.stop()
    return {
        "raw-handshake.hex": handshake.text(),
        "raw-transmission.hex": transmission.text(),
        "raw.trace": normalise(server.trace_path.read_text(), workdir),
    }


def _transmission(client: RawClient, dump: Dump) -> None:
    request: list[Field] = [
        ("magic", ">I", _hex),
        ("command flags", ">H", _hex),
        ("type", ">H", enum_of(COMMANDS)),
        ("cookie", ">Q", _dec),
        ("offset", ">Q", _dec),
        ("length", ">I", _dec),
    ]
    payload = b"hello, NBD!\n"
    dump.message(
        "C",
        "request NBD_CMD_WRITE",
        client.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 1, 1, 0, len(payload)) + payload),
        [*request, ("data", len(payload), _text)],
    )
    dump.message(
        "S",
        "simple reply",
        client.recv(16),
        [("magic", ">I", _hex), ("error", ">I", _dec), ("cookie", ">Q", _dec)],
    )
    dump.message(
        "C",
        "request NBD_CMD_READ",
        client.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 2, 0, len(payload))),
        request,
    )
    done = False
    while not done:
        header = client.recv(20)
        _, flags, kind, _, length = struct.unpack(">IHHQI", header)
        body = client.recv(length)
        fields: list[Field] = [
            ("magic", ">I", _hex),
            ("flags", ">H", flags_of(REPLY_FLAGS)),
            ("type", ">H", enum_of(CHUNK_TYPES)),
            ("cookie", ">Q", _dec),
            ("length", ">I", _dec),
            ("offset", ">Q", _dec),
        ]
        if kind == 1:
            fields.append(("data", length - 8, _text))
        elif kind == 2:
            fields.append(("hole size", ">I", _dec))
        dump.message(
            "S", f"structured reply chunk {CHUNK_TYPES.get(kind, kind)}", header + body, fields
        )
        done = bool(flags & 1)
    dump.message(
        "C",
        "request NBD_CMD_DISC",
        client.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 2, 3, 0, 0)),
        request,
    )


# -------------------------------------------------------------- the driver


def capture(out: Path, only: set[str] | None = None) -> list[str]:
    """Write every scenario's files into OUT; return their names."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    jobs: list[tuple[str, Callable[[Path], dict[str, str]]]] = [
        (s.name, functools.partial(run_scenario, s)) for s in SCENARIOS
    ]
    jobs.append(("raw", raw_session))
    for name, job in jobs:
        if only and name not in only:
            continue
        with _workdir() as workdir:
            for file_name, text in job(workdir).items():
                (out / file_name).write_text(text)
                written.append(file_name)
    return written


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    """A scratch directory under /tmp: a Unix socket path must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="nbd-docs-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def checked_in() -> Iterator[Path]:
    return (p for p in sorted(HERE.iterdir()) if p.suffix in SUFFIXES)


def check() -> int:
    """Regenerate into a temporary directory and compare with the checked-in files."""
    with _workdir() as fresh:
        capture(fresh)
        new = {p.name: p.read_text() for p in fresh.iterdir()}
    old = {p.name: p.read_text() for p in checked_in()}
    problems: list[str] = []
    for name in sorted(old.keys() | new.keys()):
        if name not in new:
            problems.append(f"docs/traces/{name}: checked in, but no scenario produces it\n")
        elif name not in old:
            problems.append(f"docs/traces/{name}: produced, but not checked in\n")
        elif old[name] != new[name]:
            problems.extend(
                difflib.unified_diff(
                    old[name].splitlines(keepends=True),
                    new[name].splitlines(keepends=True),
                    f"docs/traces/{name} (checked in)",
                    f"docs/traces/{name} (captured now)",
                )
            )
    if problems:
        sys.stdout.write("".join(problems))
        print(
            "\nThe reference server's behaviour differs from what the docs show. Update the "
            "docs: python3 docs/traces/capture.py, then review the prose around the "
            "changed traces.",
        )
        return 1
    print(f"docs/traces: {len(old)} files match the reference server")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--out", type=Path, default=HERE, help="where to write (default: here)")
    parser.add_argument("--only", action="append", help="capture only this scenario")
    args = parser.parse_args(argv)
    for tool in ("nbdinfo", "nbdsh", "qemu-io", "openssl"):
        if not shutil.which(tool, path="/usr/bin:/bin"):
            print(f"capture.py: {tool} is not installed (./bootstrap installs it)", file=sys.stderr)
            return 2
    try:
        if args.check:
            return check()
        if args.out == HERE and not args.only:
            for old in checked_in():
                old.unlink()
        for name in capture(args.out, set(args.only) if args.only else None):
            print(f"wrote {args.out / name}")
    except CaptureError as exc:
        print(f"capture.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
