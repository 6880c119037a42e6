"""Hooks another project can implement, in its conftest.py or a pytest plugin.

Registered by :mod:`conformance.plugin` (``pytest_addhooks``).  Example: a
project that packages its own NBD server adds a profile for it, so that
``pytest conformance --nbd-server=my-server`` starts and judges it, with its
known deviations recorded beside the code::

    # conftest.py
    from conformance.servers import Profile

    class MyServer(Profile):
        name = "my-server"
        def prepare_command(self, config, workdir, socket_path, tls_dir):
            return ["my-nbd-server", "--unix", socket_path, "--size", str(config.size)]

    def pytest_nbd_profiles():
        return [MyServer]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conformance.servers import Profile

hookspec = pytest.hookspec


@hookspec
def pytest_nbd_profiles() -> list[type[Profile]]:  # type: ignore[empty-body]
    """Server profiles to offer beside the built-in ones, under ``--nbd-server=NAME``.

    Each is a :class:`~conformance.servers.Profile` subclass with a unique
    ``name``; a name equal to a built-in one replaces it.
    """
