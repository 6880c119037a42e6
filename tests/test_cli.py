"""Unit tests of the command line (cli.py), run in-process.

Options keep qemu-nbd's names and defaults; bad command lines end with a short
message and a non-zero status, never a traceback.  Subprocess runs of the real
command are in test_server_e2e.py.
"""

from __future__ import annotations

import argparse
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from reference_server import __version__, cli, sockets


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("512", 512),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("1M", 1 << 20),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        ("1KiB", 1 << 10),
        (" 3M ", 3 << 20),
    ],
)
def test_parse_size_accepts_binary_suffixes(text: str, value: int) -> None:
    assert cli.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "-1", "1.5M", "1X", "1 M B", "0x10"])
def test_parse_size_rejects_nonsense(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_size(text)


def test_defaults_are_qemu_nbds() -> None:
    args = cli.build_parser().parse_args(["disk.raw"])
    assert args.shared == 1
    assert not args.persistent and not args.read_only and not args.fork
    assert args.export_name == ""
    assert args.format == "raw"
    assert args.port is None and args.bind is None  # meaning 10809 on 0.0.0.0
    assert cli.NBD_PORT == 10809


def test_long_and_short_option_names_agree() -> None:
    short_args = "-r -e 3 -t -x name -D desc -k /s -f raw -v --memory 1M"
    long_args = (
        "--read-only --shared=3 --persistent --export-name=name --description=desc "
        "--socket=/s --format=raw --verbose --memory=1M"
    )
    short = cli.build_parser().parse_args(short_args.split())
    long = cli.build_parser().parse_args(long_args.split())
    assert vars(short) == vars(long)
    assert short.memory == 1 << 20


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = cli.main(argv)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    return status, captured.err


BAD_USAGE = [
    pytest.param(["--bogus", "x.raw"], "unrecognized arguments", id="unknown-option"),
    pytest.param(["-f", "qcow2", "x.raw"], "qcow2", id="format-qcow2"),
    pytest.param(["x.raw", "--memory", "1M"], "exactly one", id="file-and-memory"),
    pytest.param([], "exactly one", id="nothing-to-export"),
    pytest.param(["--memory", "1Q"], "invalid size", id="bad-size"),
    pytest.param(["-e", "-1", "--memory", "1M"], "negative", id="negative-shared"),
    pytest.param(["-e", "two", "--memory", "1M"], "invalid number", id="non-numeric-shared"),
    pytest.param(["-p", "0", "--memory", "1M"], "port", id="port-zero"),
    pytest.param(["-p", "70000", "--memory", "1M"], "port", id="port-too-big"),
    pytest.param(["-k", "/tmp/s", "-p", "1234", "--memory", "1M"], "socket", id="socket-and-port"),
    pytest.param(["-x", "n" * 4097, "--memory", "1M"], "4096", id="export-name-too-long"),
    pytest.param(["-D", "d" * 4097, "--memory", "1M"], "4096", id="description-too-long"),
    pytest.param(["--minimum-block-size", "3", "--memory", "1M"], "power of 2", id="min-bs-3"),
    pytest.param(["--minimum-block-size", "128K", "--memory", "1M"], "power of 2", id="min-bs"),
    pytest.param(["--max-payload", "1K", "--memory", "1M"], "max-payload", id="max-payload"),
    pytest.param(["--tls-verify-peer", "--memory", "1M"], "tls-creds", id="verify-no-creds"),
    pytest.param(["--event-loop", "tornado", "--memory", "1M"], "event-loop", id="bad-loop"),
    pytest.param(["--tls=on", "--memory", "1M"], "needs --tls-creds", id="tls-on-no-creds"),
    pytest.param(
        ["--tls=off", "--tls-creds=/x", "--memory", "1M"], "contradicts", id="tls-off-creds"
    ),
    pytest.param(["--tls-only", "--memory", "1M"], "needs --tls=on", id="tls-only-no-tls"),
    pytest.param(["--export", "name=a", "--memory", "1M"], "memory= or file=", id="export-store"),
    pytest.param(["--export", "memory=1M", "--memory", "1M"], "name=NAME", id="export-no-name"),
    pytest.param(
        ["--export", "name=a,memory=1M,colour=red", "--memory", "1M"], "colour", id="export-key"
    ),
    pytest.param(
        ["--export", "name=a,memory=1M,tls-only=maybe", "--memory", "1M"], "on or off", id="bool"
    ),
    pytest.param(["--export", "name=,memory=1M", "--memory", "1M"], "two exports", id="dup"),
    pytest.param(
        ["--export", "name=a,memory=1M,tls-only=on", "--memory", "1M"], "--tls=on", id="no-tls"
    ),
]


def test_uvloop_where_it_is_not_installed_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    status, err = run(["--event-loop", "uvloop", "--memory", "1M", "-k", "/tmp/unused"], capsys)
    assert status == 2
    assert "uvloop" in err.splitlines()[0] and "pip install uvloop" in err.splitlines()[0]


@pytest.mark.parametrize(("argv", "needle"), BAD_USAGE)
def test_bad_usage_exits_2_with_a_short_message(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = run(argv, capsys)
    assert status == 2
    lines = err.splitlines()
    assert lines[0].startswith(f"{cli.PROG}: "), err
    assert needle in lines[0], f"expected {needle!r} in {lines[0]!r}"
    assert len(lines) <= 2, f"expected a one-line message (plus a --help hint), got {err!r}"


def test_missing_file_exits_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = run([str(tmp_path / "missing.raw"), "-k", str(tmp_path / "s")], capsys)
    assert status == 1
    assert err.count("\n") == 1 and "cannot open" in err and "missing.raw" in err
    assert not (tmp_path / "s").exists()


def test_directory_as_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, err = run([str(tmp_path), "-k", str(tmp_path / "s")], capsys)
    assert status == 1
    assert err.startswith(f"{cli.PROG}: ") and err.count("\n") == 1


def test_socket_path_that_is_a_regular_file_is_not_clobbered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "not-a-socket"
    victim.write_text("precious")
    status, err = run(["--memory", "1M", "-k", str(victim)], capsys)
    assert status == 1
    assert "not a socket" in err
    assert victim.read_text() == "precious"


def test_memory_larger_than_the_address_space_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 2^63 bytes cannot be mapped anywhere: a one-line error, no traceback,
    # and no socket left behind.
    status, err = run(["--memory", str(1 << 63), "-k", str(tmp_path / "s")], capsys)
    assert status == 1
    assert err.startswith(f"{cli.PROG}: --memory: cannot map") and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_tls_creds_directory_without_certificates_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = run(
        ["--memory", "1M", "-k", str(tmp_path / "s"), "--tls-creds", str(tmp_path)], capsys
    )
    assert status == 1
    assert "server-cert.pem" in err and err.count("\n") == 1


def test_tls_creds_that_do_not_parse_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("server-cert.pem", "server-key.pem", "ca-cert.pem"):
        (tmp_path / name).write_text("not a pem\n")
    status, err = run(
        ["--memory", "1M", "-k", str(tmp_path / "s"), "--tls-creds", str(tmp_path)], capsys
    )
    assert status == 1
    assert "cannot load credentials" in err and err.count("\n") == 1


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["-V"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"{cli.PROG} {__version__}"
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name in (
        "--read-only", "--shared", "--persistent", "--export-name", "--description",
        "--socket", "--port", "--bind", "--format", "--fork", "--pid-file", "--tls-creds",
        "--verbose", "--trace", "--version", "--memory",
    ):  # fmt: skip
        assert name in text, f"{name} missing from --help"


# -------------------------------------------------------------- listening


def test_unix_listener_appears_ready_and_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "nbd.sock")
    first = sockets.unix_listener(path)
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert os.listdir(tmp_path) == ["nbd.sock"], "temporary name left behind"
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)  # already listening when the path appears
    finally:
        first.close()
    second = sockets.unix_listener(path)
    second.close()


def test_unix_listener_path_too_long_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(sockets.StartupError):
        sockets.unix_listener(str(tmp_path / ("x" * 120)))


def test_the_server_imports_nothing_outside_the_standard_library_unless_asked() -> None:
    # uvloop is optional: only --event-loop=uvloop may import it (the unit env has it installed).
    probe = (
        "import sys; from reference_server import cli; "
        "cli._check(cli.build_parser().parse_args(['--memory', '1M'])); "
        "assert 'uvloop' not in sys.modules, 'uvloop imported without being asked for'"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
