"""The external-server profile (``--uri``): a server someone already runs.

Every NBD URI form libnbd knows is accepted: ``nbd://host[:port]/export``,
``nbds://...`` and ``nbd+unix:///export?socket=PATH``, ``nbds+unix://...``
(``tls-certificates=DIR`` in the query names client credentials).  The
suite cannot reconfigure such a server: a check that needs a particular
configuration runs only when the server already is in it, and is skipped
with the reason otherwise.  Nothing is written unless ``--allow-writes``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from conformance.servers.base import DEFAULT_SIZE, Profile, ProfileCannotDo, Server, ServerConfig
from conformance.target import Target

NBD_PORT = 10809


@dataclasses.dataclass(frozen=True)
class NbdUri:
    tls: bool
    export_name: str
    socket_path: str | None = None
    host: str | None = None
    port: int = NBD_PORT
    tls_certificates: str | None = None


def parse_uri(uri: str) -> NbdUri:
    """Parse an NBD URI (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md)."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in ("nbd", "nbds", "nbd+unix", "nbds+unix"):
        raise ValueError(f"not an NBD URI (scheme {parts.scheme!r}): {uri}")
    tls = scheme.startswith("nbds")
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = parse_qs(parts.query, keep_blank_values=True)
    certs = query.get("tls-certificates", [None])[0]
    if scheme.endswith("+unix"):
        if parts.netloc:
            raise ValueError(f"a Unix-socket NBD URI has no host: {uri}")
        sockets = query.get("socket")
        if not sockets or not sockets[0]:
            raise ValueError(f"a Unix-socket NBD URI needs ?socket=PATH: {uri}")
        return NbdUri(tls=tls, export_name=export, socket_path=sockets[0], tls_certificates=certs)
    if not parts.hostname:
        raise ValueError(f"an NBD URI over TCP needs a host: {uri}")
    return NbdUri(
        tls=tls,
        export_name=export,
        host=parts.hostname,
        port=parts.port or NBD_PORT,
        tls_certificates=certs,
    )


class UriProfile(Profile):
    name = "uri"
    starts_servers = False

    def __init__(self, uri: str, allow_writes: bool) -> None:
        self.uri = uri
        self.parsed = parse_uri(uri)
        self.allow_writes = allow_writes
        self._read_only: bool | None = None

    def server(self, config: ServerConfig) -> Server:
        p = self.parsed
        target = Target(
            uri=self.uri,
            export_name=p.export_name,
            socket_path=p.socket_path,
            address=(p.host, p.port) if p.host is not None else None,
            tls_dir=p.tls_certificates,
        )
        return Server(target=target, config=config, started_by_suite=False, profile=self.name)

    def running_server(self) -> Server:
        return self.server(ServerConfig(tls=self.parsed.tls))

    def read_only(self) -> bool:
        """Whether the server advertises NBD_FLAG_READ_ONLY (asked once)."""
        if self._read_only is None:
            probe = self.server(ServerConfig(tls=self.parsed.tls))
            try:
                h = probe.connect()
                self._read_only = bool(h.is_read_only())
            finally:
                probe.close_clients()
        return self._read_only

    def check_config(self, config: ServerConfig) -> None:
        p = self.parsed
        if config.tls != p.tls:
            raise ProfileCannotDo(
                f"the server at {self.uri} is {'' if p.tls else 'not '}"
                f"reached over TLS; the check needs tls={config.tls}"
            )
        if config.shared is not None:
            raise ProfileCannotDo(
                "the suite cannot set the connection limit of a server it did not start"
            )
        if config.description is not None:
            raise ProfileCannotDo(
                "the suite cannot set the description of a server it did not start"
            )
        if config.export_name and config.export_name != p.export_name:
            raise ProfileCannotDo(f"the check needs export name {config.export_name!r}")
        if config.size != DEFAULT_SIZE:
            raise ProfileCannotDo(f"the check needs an export of {config.size} bytes")
        if config.read_only != self.read_only():
            state = "read-only" if self.read_only() else "writable"
            raise ProfileCannotDo(
                f"the server at {self.uri} is {state}; the check needs read_only={config.read_only}"
            )

    def start(self, config: ServerConfig, workdir: Path, tls_dir: str | None) -> Server:
        self.check_config(config)
        return self.server(config)
