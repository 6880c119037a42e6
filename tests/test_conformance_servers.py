"""The suite's server plumbing: URIs, command templates, readiness, verifiers, patterns."""

from __future__ import annotations

import os
import socket

import pytest

from conformance.data import pattern
from conformance.servers.base import ProfileCannotDo, ServerConfig
from conformance.servers.command import CommandProfile
from conformance.servers.process import unix_socket_listening
from conformance.servers.uri import NbdUri, parse_uri
from conformance.spec import SpecViolation, expect_data, expect_equal, expect_nbd_error


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("nbd://example.com/disk", NbdUri(tls=False, export_name="disk", host="example.com")),
        ("nbd://127.0.0.1:10810", NbdUri(tls=False, export_name="", host="127.0.0.1", port=10810)),
        ("nbds://[::1]:1234/a%20b", NbdUri(tls=True, export_name="a b", host="::1", port=1234)),
        ("nbd+unix:///?socket=/tmp/s", NbdUri(tls=False, export_name="", socket_path="/tmp/s")),
        (
            "nbds+unix:///x?socket=/run/n.sock&tls-certificates=/etc/pki",
            NbdUri(
                tls=True, export_name="x", socket_path="/run/n.sock", tls_certificates="/etc/pki"
            ),
        ),
    ],
)
def test_parse_uri(uri, parsed):
    assert parse_uri(uri) == parsed


@pytest.mark.parametrize(
    "uri",
    ["http://host/x", "nbd+unix:///x", "nbd+unix://host/x?socket=/s", "nbd:///x", "nbd+vsock:///x"],
)
def test_parse_uri_rejects(uri):
    with pytest.raises(ValueError):
        parse_uri(uri)


def test_command_template_formats_every_placeholder(tmp_path):
    profile = CommandProfile(
        "srv -k {socket} --size {size} -x {export} {read_only:-r} "
        "-e {shared} {tls:--tls} --creds={tls_dir} -D {description}"
    )
    config = ServerConfig(
        size=1024, export_name="", shared=1, read_only=True, tls=True, description="two words"
    )
    argv = profile.prepare_command(config, tmp_path, "/tmp/s", "/certs")
    assert argv == [
        "srv",
        "-k",
        "/tmp/s",
        "--size",
        "1024",
        "-x",
        "",
        "-r",
        "-e",
        "1",
        "--tls",
        "--creds=/certs",
        "-D",
        "two words",
    ]
    argv = profile.prepare_command(ServerConfig(), tmp_path, "/tmp/s", None)
    assert argv == [
        "srv",
        "-k",
        "/tmp/s",
        "--size",
        str(64 << 20),
        "-x",
        "",
        "-e",
        "0",
        "--creds=",
        "-D",
        "",
    ]


def test_command_template_nests_placeholders(tmp_path):
    profile = CommandProfile("srv -k {socket} {tls:--tls-creds={tls_dir}}")
    profile.check_config(ServerConfig(tls=True))
    assert profile.prepare_command(ServerConfig(tls=True), tmp_path, "/s", "/c") == [
        "srv",
        "-k",
        "/s",
        "--tls-creds=/c",
    ]
    assert profile.prepare_command(ServerConfig(), tmp_path, "/s", None) == ["srv", "-k", "/s"]


def test_command_template_skips_configurations_it_cannot_express():
    profile = CommandProfile("srv -k {socket} --memory {size}")
    profile.check_config(ServerConfig(size=4096))
    with pytest.raises(ProfileCannotDo, match="read_only"):
        profile.check_config(ServerConfig(read_only=True))
    with pytest.raises(ProfileCannotDo, match="shared"):
        profile.check_config(ServerConfig(shared=1))


@pytest.mark.parametrize("template", ["srv --memory {size}", "srv -k {socket} {nonsense}"])
def test_command_template_is_validated(template):
    with pytest.raises(ValueError):
        CommandProfile(template)


def test_server_config_describes_what_differs():
    assert ServerConfig().describe() == "the default configuration"
    assert ServerConfig(read_only=True, shared=1).describe() == "read_only=True, shared=1"


def test_unix_socket_readiness(tmp_path):
    path = str(tmp_path / "s")
    assert not unix_socket_listening(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        assert not unix_socket_listening(path)  # bound, not yet listening
        sock.listen(1)
        assert unix_socket_listening(path)
        # Bound under a temporary name, renamed into place once listening.
        renamed = str(tmp_path / "renamed")
        os.rename(path, renamed)
        assert unix_socket_listening(renamed)
    finally:
        sock.close()


def test_pattern_words_say_where_they_belong():
    data = pattern(0, 64, tag=3)
    assert data[:8] == (3 << 48).to_bytes(8, "little")
    assert data[8:16] == ((3 << 48) | 8).to_bytes(8, "little")
    assert pattern(5, 20, tag=3) == data[5:25]
    assert pattern(0, 64, tag=4) != data
    assert pattern(10, 0) == b""


def test_expect_data_reports_the_first_difference_not_the_data():
    expected = bytes(1 << 20)
    actual = bytearray(expected)
    actual[700000] = 1
    with pytest.raises(SpecViolation) as info:
        expect_data(actual, expected, "read")
    message = str(info.value)
    assert "first difference at byte 700000 of 1048576" in message
    assert len(message) < 200
    with pytest.raises(SpecViolation, match="expected 4 bytes, actual 3"):
        expect_data(b"abc", b"abcd", "read")
    expect_data(bytearray(b"same"), b"same", "read")


def test_expect_equal_message():
    with pytest.raises(SpecViolation, match=r"^size: expected 2, actual 1$"):
        expect_equal(1, 2, "size")


def test_expect_nbd_error():
    nbd = pytest.importorskip("nbd")

    def fail(errnum):
        def call():
            raise nbd.Error("boom", errnum)

        return call

    assert expect_nbd_error(fail(1), 1, "write").args == ("boom", 1)
    expect_nbd_error(fail(22), {22, 75}, "write")
    with pytest.raises(SpecViolation, match=r"expected error EPERM \(1\), actual error EINVAL"):
        expect_nbd_error(fail(22), 1, "write")
    with pytest.raises(SpecViolation, match="actual success"):
        expect_nbd_error(lambda: None, 1, "write")
