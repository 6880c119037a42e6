"""Server-under-test profiles: how to start (or reach) each server the suite judges."""

from __future__ import annotations

from conformance.servers.base import (
    Deviation,
    Profile,
    ProfileCannotDo,
    Server,
    ServerConfig,
)
from conformance.servers.nbd_server import NbdServer
from conformance.servers.nbdkit import Nbdkit
from conformance.servers.qemu_nbd import QemuNbd
from conformance.servers.reference import Reference

__all__ = ["PROFILES", "Deviation", "Profile", "ProfileCannotDo", "Server", "ServerConfig"]

#: The built-in profiles, by their --nbd-server name.
PROFILES: dict[str, type[Profile]] = {
    "reference": Reference,
    "qemu-nbd": QemuNbd,
    "nbdkit": Nbdkit,
    "nbd-server": NbdServer,
}
