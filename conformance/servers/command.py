"""The command-template profile (``--server-cmd``): any server started per check.

The template is split like a shell command line, then each word is
formatted with these placeholders:

``{socket}``       the Unix socket path the server must listen on (required)
``{size}``         the export size in bytes
``{export}``       the export name ("" for the default export)
``{description}``  the export description
``{shared}``       the connection limit (0 = unlimited)
``{tls_dir}``      directory with ca-cert.pem, server-cert.pem, server-key.pem
``{minimum_block_size}`` the minimum block size to advertise and enforce (1 = none)
``{read_only:W}``  the word W when the export must be read-only, else nothing
``{tls:W}``        the word W when TLS is required, else nothing

A word made only of ``{read_only:W}``/``{tls:W}`` that formats to nothing is
dropped.  A configuration that needs a
placeholder the template lacks is skipped with that reason, e.g.
``--server-cmd 'myserver -k {socket} --memory {size} {read_only:-r} -e {shared}'``.
"""

from __future__ import annotations

import shlex
import string
from pathlib import Path
from typing import Any

from conformance.servers.base import DEFAULT_SIZE, Profile, ProfileCannotDo, ServerConfig


class _Formatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, bool):
            return format_spec if value else ""
        return str(super().format_field(value, format_spec))


def placeholders(template: str) -> set[str]:
    """The fields a template uses, including those nested in a format spec."""
    fields: set[str] = set()
    for _, field, spec, _ in string.Formatter().parse(template):
        if field:
            fields.add(field)
        if spec:
            fields |= placeholders(spec)
    return fields


class CommandProfile(Profile):
    name = "command"

    def __init__(self, template: str) -> None:
        self.template = template
        self.fields = placeholders(template)
        if "socket" not in self.fields:
            raise ValueError("--server-cmd needs a {socket} placeholder")
        unknown = self.fields - {
            "socket",
            "size",
            "export",
            "description",
            "shared",
            "tls_dir",
            "read_only",
            "tls",
            "minimum_block_size",
        }
        if unknown:
            raise ValueError(f"--server-cmd: unknown placeholders {sorted(unknown)}")
        self.sets_minimum_block_size = "minimum_block_size" in self.fields

    def check_config(self, config: ServerConfig) -> None:
        needs = {
            "size": config.size != DEFAULT_SIZE,
            "export": bool(config.export_name),
            "description": config.description is not None,
            "shared": config.shared is not None,
            "read_only": config.read_only,
            "tls": config.tls,
        }
        for field, needed in needs.items():
            if needed and field not in self.fields:
                raise ProfileCannotDo(
                    f"the --server-cmd template has no {{{field}}} "
                    f"placeholder (needed for {config.describe()})"
                )
        if config.tls and "tls_dir" not in self.fields:
            raise ProfileCannotDo("the --server-cmd template has no {tls_dir} placeholder")

    def prepare_command(
        self, config: ServerConfig, workdir: Path, socket_path: str, tls_dir: str | None
    ) -> list[str]:
        values = {
            "socket": socket_path,
            "size": config.size,
            "export": config.export_name,
            "description": config.description or "",
            "shared": 0 if config.shared is None else config.shared,
            "tls_dir": tls_dir or "",
            "read_only": config.read_only,
            "tls": config.tls,
            "minimum_block_size": config.minimum_block_size,
        }
        formatter = _Formatter()
        argv = []
        for word in shlex.split(self.template):
            text = formatter.format(word, **values)
            # Only a word made of switches ({read_only:-r}) vanishes; an empty
            # export name stays an (empty) argument.
            switches = {field for _, field, _, _ in string.Formatter().parse(word) if field}
            if text or not switches <= {"read_only", "tls"}:
                argv.append(text)
        return argv
