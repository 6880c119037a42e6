"""Unit tests of ``--export`` and ``--tls`` (reference_server/export_spec.py).

qemu's property syntax (a doubled comma is a comma), nbdkit's ``--tls``
values, and the TLS-only flag each export ends up with: ``require`` makes
every export TLS-only (FORCEDTLS), ``on`` only those marked (SELECTIVETLS).
"""

from __future__ import annotations

import argparse

import pytest

from reference_server import cli
from reference_server.backends import MemoryBackend
from reference_server.export_spec import (
    ExportSpec,
    TLSOption,
    export_info,
    split_properties,
    tls_option,
)
from reference_server.protocol.export import BlockSizes


def test_properties_split_at_single_commas_only() -> None:
    assert split_properties("name=a,,b,memory=1M") == {"name": "a,b", "memory": "1M"}
    assert split_properties("description=") == {"description": ""}
    with pytest.raises(argparse.ArgumentTypeError, match="twice"):
        split_properties("name=a,name=b")
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        split_properties("name=a,read-only")


def test_a_full_export_spec_is_parsed_with_the_cli_size_syntax() -> None:
    args = cli.build_parser().parse_args(
        ["--memory", "1M", "--export", "name=s,memory=2M,description=x,,y,read-only=on,tls-only=on"]
    )
    assert args.exports == [
        ExportSpec(name="s", memory=2 << 20, description="x,y", read_only=True, tls_only=True)
    ]


def test_the_first_export_comes_from_qemu_nbds_options() -> None:
    args = cli.build_parser().parse_args(
        ["-x", "a", "-D", "d", "-r", "--tls-only", "disk.raw", "--export", "name=b,file=f"]
    )
    first, second = cli.export_specs(args)
    assert first == ExportSpec("a", None, "disk.raw", "d", read_only=True, tls_only=True)
    assert second == ExportSpec("b", file="f")


@pytest.mark.parametrize(
    ("value", "credentials", "expected"),
    [
        (None, False, TLSOption.OFF),
        (None, True, TLSOption.REQUIRE),  # qemu-nbd: --tls-creds alone requires TLS
        ("on", True, TLSOption.ON),
        ("require", True, TLSOption.REQUIRE),
    ],
)
def test_tls_defaults_to_qemu_nbds_behaviour(
    value: str | None, credentials: bool, expected: TLSOption
) -> None:
    assert tls_option(value, credentials) is expected


@pytest.mark.parametrize(
    ("tls", "marked", "tls_only"),
    [
        (TLSOption.REQUIRE, False, True),
        (TLSOption.ON, False, False),
        (TLSOption.ON, True, True),
        (TLSOption.OFF, False, False),
    ],
)
def test_each_export_is_tls_only_as_the_mode_says(
    tls: TLSOption, marked: bool, tls_only: bool
) -> None:
    spec = ExportSpec("e", memory=4096, tls_only=marked)
    info = export_info(spec, MemoryBackend(4096), shared=0, sizes=BlockSizes(), tls=tls)
    assert info.tls_only is tls_only
    assert info.multi_conn and info.size == 4096
