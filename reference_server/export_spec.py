"""The exports a command line asks for, and the TLS mode they run under.

One export comes from qemu-nbd's options (*FILENAME* or ``--memory``,
``-x``, ``-D``, ``-r``); each ``--export`` adds another, written the way
qemu writes an object's properties::

    --export name=NAME,memory=SIZE|file=PATH[,description=TEXT][,read-only=on][,tls-only=on]

(a comma inside a value is doubled, as in qemu: ``description=a,,b``).

``--tls=off|on|require`` is nbdkit's option, and picks the spec's mode
("TLS support / Server-side requirements"): ``off`` NOTLS, ``require``
FORCEDTLS (every export TLS-only, qemu-nbd's behaviour with
``--tls-creds``, hence the default then), ``on`` SELECTIVETLS: TLS at the
client's choice, mandatory on the exports marked ``tls-only``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from .backends.base import Backend
from .protocol.export import BlockSizes, ExportInfo

TLS_CHOICES = ("off", "on", "require")


class TLSOption(Enum):
    """``--tls``: nbdkit's three values, and the spec mode each one selects."""

    OFF = "off"  # NOTLS
    ON = "on"  # SELECTIVETLS: TLS-only exports need it, the others take it if asked
    REQUIRE = "require"  # FORCEDTLS


@dataclass(frozen=True)
class ExportSpec:
    """One export as the command line describes it (storage not opened yet)."""

    name: str
    memory: int | None = None
    file: str | None = None
    description: str = ""
    read_only: bool = False
    tls_only: bool = False


_KEYS = ("name", "memory", "file", "description", "read-only", "tls-only")
_BOOLEANS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


def split_properties(text: str) -> dict[str, str]:
    """``a=1,b=x,,y`` -> {"a": "1", "b": "x,y"} (qemu's doubled comma)."""
    properties: dict[str, str] = {}
    for item in text.replace(",,", "\0").split(","):
        key, equals, value = item.partition("=")
        if not equals:
            raise argparse.ArgumentTypeError(f"{item.replace(chr(0), ',')!r} is not KEY=VALUE")
        if key in properties:
            raise argparse.ArgumentTypeError(f"{key} given twice")
        properties[key] = value.replace("\0", ",")
    return properties


def _boolean(key: str, value: str) -> bool:
    try:
        return _BOOLEANS[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{key}={value}: use on or off") from None


def export_spec_parser(parse_size: Callable[[str], int]) -> Callable[[str], ExportSpec]:
    """The argparse ``type`` of ``--export``, with the CLI's size syntax."""

    def parse(text: str) -> ExportSpec:
        properties = split_properties(text)
        unknown = sorted(set(properties) - set(_KEYS))
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown key {unknown[0]!r} (known: {', '.join(_KEYS)})"
            )
        if "name" not in properties:
            raise argparse.ArgumentTypeError("an --export needs name=NAME")
        if ("memory" in properties) == ("file" in properties):
            raise argparse.ArgumentTypeError("an --export needs exactly one of memory= or file=")
        memory = properties.get("memory")
        return ExportSpec(
            name=properties["name"],
            memory=None if memory is None else parse_size(memory),
            file=properties.get("file"),
            description=properties.get("description", ""),
            read_only=_boolean("read-only", properties.get("read-only", "off")),
            tls_only=_boolean("tls-only", properties.get("tls-only", "off")),
        )

    return parse


def tls_option(value: str | None, have_credentials: bool) -> TLSOption:
    """``--tls`` as given, or its default: require with credentials (as qemu-nbd), else off."""
    if value is None:
        return TLSOption.REQUIRE if have_credentials else TLSOption.OFF
    return TLSOption(value)


def check_tls(option: TLSOption, have_credentials: bool, specs: list[ExportSpec]) -> str | None:
    """What is wrong with this TLS setup, or None."""
    if option is not TLSOption.OFF and not have_credentials:
        return f"--tls={option.value} needs --tls-creds"
    if option is TLSOption.OFF and have_credentials:
        return "--tls=off contradicts --tls-creds"
    if option is TLSOption.OFF and any(spec.tls_only for spec in specs):
        return "a TLS-only export needs --tls=on"
    names = [spec.name for spec in specs]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        return f"two exports are named {duplicate!r}"
    return None


def export_info(
    spec: ExportSpec,
    backend: Backend,
    *,
    shared: int,
    sizes: BlockSizes,
    tls: TLSOption,
    next_data: bool = False,
) -> ExportInfo:
    """What the handshake advertises of SPEC, served from BACKEND."""
    return ExportInfo(
        name=spec.name,
        size=backend.size,
        description=spec.description,
        read_only=spec.read_only,
        # qemu-nbd (since 7.1): multi-conn whenever more than one client may connect.
        multi_conn=shared != 1,
        can_fast_zero=backend.can_fast_zero,
        block_sizes=sizes,
        # --tls=require makes every export TLS-only: FORCEDTLS (tls_policy.py).
        tls_only=tls is TLSOption.REQUIRE or spec.tls_only,
        # --next-data: every export offers x-reference:next-data.
        next_data=next_data,
    )
