"""Server-under-test profiles: how to start (or reach) each server the suite judges.

The profiles are loaded on first use: :mod:`conformance.servers.peers` (each
server's command line) and :mod:`conformance.servers.process` (starting and
stopping it) are the toolkit's one server harness, imported by scripts that
have no libnbd (the benchmarks, the docs' trace capture, the iotests).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conformance.servers.base import (
        Deviation,
        Profile,
        ProfileCannotDo,
        Server,
        ServerConfig,
    )

__all__ = ["PROFILES", "Deviation", "Profile", "ProfileCannotDo", "Server", "ServerConfig"]

PROFILES: dict[str, type[Profile]]


def _profiles() -> dict[str, type[Profile]]:
    from conformance.servers.nbd_server import NbdServer
    from conformance.servers.nbdkit import Nbdkit
    from conformance.servers.qemu_nbd import QemuNbd
    from conformance.servers.reference import Reference

    #: The built-in profiles, by their --nbd-server name.
    return {
        "reference": Reference,
        "qemu-nbd": QemuNbd,
        "nbdkit": Nbdkit,
        "nbd-server": NbdServer,
    }


def __getattr__(name: str) -> Any:
    if name == "PROFILES":
        profiles = _profiles()
        globals()["PROFILES"] = profiles  # once: every caller shares (and may extend) it
        return profiles
    if name in __all__:
        value = getattr(importlib.import_module("conformance.servers.base"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
